"""Training a LoRA: config -> data -> model and caches (setup) -> the loop -> the adapter file.

    config.py      the training config (one dataclass; flags and TOML come from it)
    data.py        finding images and captions, buckets, the dataset and its sampler
    caching.py     latents and text-encoder outputs, computed once
    loss.py        the diffusion loss and its options, as pure functions
    prior.py       prior preservation: class images made once and kept with their fingerprint
    steps.py       the step math: lr schedule, EMA, generators, each step's global batch and its shares
    checkpoint.py  checkpoints and resuming
    runlog.py      the metrics log and TensorBoard, opened once on the main process
    control.py     steering a run from another process: request files in, an events log out
    setup.py       setting a run up: the base model, the adapter, the image sets, the optimizer, each returned
    loop.py        the Run that setup built, its micro-batch loss, and the loop, in one function
"""
