"""A diffusers model folder's model_index.json: what both a folder and a single file's configs are read from."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelSourceError


def read_model_index(folder: Path, advice: str) -> dict:
    """The folder's model_index.json as a dict; `advice` says what to pass instead when there is none."""
    try:
        return json.loads((folder / "model_index.json").read_text())
    except FileNotFoundError:
        raise ModelSourceError(f"{folder}: no model_index.json, so not a diffusers-format folder; {advice}") from None
    except json.JSONDecodeError as error:
        raise ModelSourceError(f"{folder / 'model_index.json'}: not valid JSON ({error})") from None
