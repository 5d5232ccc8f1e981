"""The `sdlora` command, `python -m sdlora …` and `accelerate launch -m sdlora train …`.

Torch-free until the thread policy is in the environment, so that torch's OpenMP runtime reads it.
"""

import sys

from .threads import use_cpu_policy


def main() -> int:
    use_cpu_policy()
    from .cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
