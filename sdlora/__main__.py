"""`python -m sdlora …` and `accelerate launch -m sdlora train …`."""

import sys

from .cli import main

sys.exit(main())
