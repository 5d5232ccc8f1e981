"""The toy world: a procedural world of coloured shapes, its tiny pretrained model, and the
measurements it makes possible.

    world.py      the shapes, their captions, the datasets we ship, and the scorer
    pipelines.py  tiny Stable Diffusion pipelines built in code (tests, demos, benchmarks)
    pretrain.py   how models/toy-sd1 was made
    eval.py       scoring adapters at several strengths, and the CPU demo
    compare.py    two configs trained and scored side by side (`sdlora toy eval --config … --change …`)

`from sdlora import toy` gives the world's names (toy.score, toy.DATASETS, ...), as before.
"""

from .world import *  # noqa: F401,F403
