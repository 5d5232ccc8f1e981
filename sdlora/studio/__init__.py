"""sdlora studio: a local web app to queue, watch, steer and compare trainings.

It is a separate process that only reads the files a run writes anyway (config.toml, logs/, samples/,
checkpoints/, the lock) and writes two kinds of its own: requests in a run's control/ folder, which the
trainer takes between steps (training/control.py), and its queue. So closing or killing the studio never
touches a training, and a run started from the command line shows up like one started from a page.

    facts.py     what a run folder says about its run: status from the lock and the files, never a flag
    metrics.py   a run's metrics, read incrementally and downsampled for a chart
    queue.py     the persisted queue and the `sdlora train` processes it starts
    security.py  who may ask what: token, same-origin, paths kept inside their folders
    jobs.py      background work beside trainings (strength grids, toy scores), its result file its state
    datasets.py  a data folder as the trainer sees it, and caption edits that never lose a text
    forms.py     the New-run form, generated from the TrainConfig dataclass, with the CLI's messages
    app.py       the pages and the JSON API (Starlette), and `serve`
"""
