"""The test environment itself: the lock matches pyproject.toml, and a bad peft is named plainly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from packaging.requirements import Requirement

from sdlora.toy.pipelines import peft_mismatch

if sys.version_info >= (3, 11):
    import tomllib
else:  # a dependency of sdlora on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def locked_versions() -> dict[str, str]:
    """The lock's pins, read by the same code `make test-latest` uses (.ci/versions.py)."""
    spec = importlib.util.spec_from_file_location("ci_versions", ROOT / ".ci" / "versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pins(str(ROOT / "requirements-lock.txt"))


def test_lock_pins_every_dependency_within_its_range():
    """A pyproject.toml edited without `make lock` fails here, not in a user's install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked_versions()
    specs, extras = project["dependencies"] + project["optional-dependencies"]["dev"], project["optional-dependencies"]
    # dev names other extras of the project itself ("sdlora[studio]"): their requirements are dev's too
    specs = [included for spec in specs for included in
             (sum((extras[extra] for extra in Requirement(spec).extras), [])
              if Requirement(spec).name == project["name"] else [spec])]
    assert not any(Requirement(spec).name == project["name"] for spec in specs)
    for spec in specs:
        requirement = Requirement(spec)
        if requirement.marker and not requirement.marker.evaluate({"python_version": "3.11"}):
            continue  # the lock is resolved for Python 3.11
        name = requirement.name.lower().replace("_", "-")
        if name == "torch":  # left out on purpose: users keep the build that fits their GPU
            assert name not in pins
            continue
        assert name in pins, f"{name} is not in requirements-lock.txt: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements-lock.txt pins {name}=={pins[name]}, outside pyproject's {spec!r}: run make lock")


def test_a_peft_too_old_for_transformers_is_named_with_the_fix():
    message = peft_mismatch("0.21.2", "5.24.0", "0.22.0", "install the lock")
    assert message == ("peft 0.21.2 is installed, but transformers 5.24.0 refuses peft below 0.22.0: "
                       "install the lock")
    assert peft_mismatch("0.22.0", "5.24.0", "0.22.0", "fix") is None
    assert peft_mismatch("0.13.0", "4.40.0", None, "fix") is None
