"""The New-run form, generated from TrainConfig as the command-line flags are.

Each field of the dataclass is one form field with its flag, group, help, default, type and
choices, all read from the dataclass. What a form or a TOML body sends is converted by the CLI's
type rules, checked by `_check_value` and `validate`, and every refusal comes back keyed by the
field it names, in the words the command line would use.
"""

from __future__ import annotations

import re
import typing
from dataclasses import fields

from ..errors import ConfigError
from ..training.config import CHOICES, REQUIRED, TrainConfig, _check_value, _types, flag, parse_toml, validate

FORM = "form"  # how errors name the source of a value, as read_toml names its file
TOML = "TOML"
TRUE, FALSE = ("true", "on", "1", "yes"), ("false", "off", "0", "no")  # "on": a checkbox's value
_FIELDS = [f.name for f in fields(TrainConfig)]


def _kind(kind) -> str:
    if typing.get_origin(kind) is list:
        return "list"
    return kind.__name__  # bool, int, float or str


def form_fields() -> list[dict]:
    """One dict per TrainConfig field, in declaration order: name, flag, group, help, default, type
    (bool, int, float, str or list: of strings), optional (None is a value), choices, required."""
    types, hints = _types(), typing.get_type_hints(TrainConfig)
    return [{
        "name": f.name,
        "flag": flag(f.name),
        "group": f.metadata["group"],
        "help": f.metadata["help"],
        "default": f.default,
        "type": _kind(types[f.name]),
        "optional": hints[f.name] != types[f.name],
        "choices": list(CHOICES[f.name]) if f.name in CHOICES else None,
        "required": f.name in REQUIRED,
    } for f in fields(TrainConfig)]


def _convert(kind, value):
    """A form value as the command line would have parsed it; None for an empty one (the default)."""
    if value == "":
        return None
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        return value  # a bool as it is; anything else is refused by _check_value, naming the key
    if typing.get_origin(kind) is list:
        # A textarea, one entry a line (browsers send CRLF), or the list itself; blank lines are none.
        items = value.splitlines() if isinstance(value, str) else value
        if isinstance(items, list):
            items = [item for item in items if not isinstance(item, str) or item.strip()]
        return items or None
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)  # argparse's own conversion of the flag's text
        except ValueError:
            return value  # _check_value refuses it: "rank must be int, got 'x' (str)"
    return value


def _named_field(message: str) -> str:
    """The field a message names first (as key, --flag, --no-flag or in words), or "" if none."""
    found = []
    for name in _FIELDS:
        spellings = {name, name.replace("_", " "), flag(name), "--no-" + flag(name)[2:]}
        for spelling in spellings:
            if match := re.search(rf"(?<![\w-]){re.escape(spelling)}(?![\w-])", message):
                found.append((match.start(), -len(spelling), name))
    return min(found)[2] if found else ""


def _checked(values: dict, source: str) -> tuple[TrainConfig | None, dict[str, str]]:
    """The config of checked `values`, validated; or None and the errors, by field."""
    errors, checked = {}, {}
    for key, value in values.items():
        try:
            checked[key] = _check_value(key, value, source)
        except ConfigError as error:
            field = key if key in _FIELDS else ""  # unknown keys share "", each message naming its key
            errors[field] = "; ".join(filter(None, (errors.get(field), str(error))))
    if errors:
        return None, errors
    config = TrainConfig(**checked)
    try:
        validate(config)  # which creates output_dir (and class_data_dir) to know they are writable
    except ConfigError as error:
        return None, {_named_field(str(error)): str(error)}
    return config, {}


def config_from_form(values: dict, overrides: dict | None = None) -> tuple[TrainConfig | None, dict[str, str]]:
    """The validated config of a submitted form, or None and {field: message} (key "" for a message that
    names no field). Values are strings (or bools, or a list for a list field); an empty string or a
    missing key leaves the field at its default. Bools read true/false/on/off/1/0/yes/no. `overrides`
    (checked values) replace what the form says: the studio decides the output folder."""
    return _checked(_overridden(_converted(values), overrides), FORM)


def _converted(values: dict) -> dict:
    types = _types()
    converted = {}
    for key, value in values.items():
        value = _convert(types[key], value) if key in types else value
        if value is not None:
            converted[key] = value
    return converted


def unvalidated_config(values: dict, overrides: dict | None = None) -> TrainConfig | None:
    """The config a form's values spell, before `validate` (for the TOML view of a form still being filled
    in); None while a value has the wrong type."""
    try:
        checked = {key: _check_value(key, value, FORM) for key, value in _overridden(_converted(values),
                                                                                    overrides).items()}
    except ConfigError:
        return None
    return TrainConfig(**checked)


def config_from_toml(text: str, overrides: dict | None = None) -> tuple[TrainConfig | None, dict[str, str]]:
    """The validated config of a TOML body, as `--config FILE` would read it; or None and the errors."""
    try:
        raw = parse_toml(text, TOML)
    except ConfigError as error:
        return None, {"": str(error)}
    return _checked(_overridden(raw, overrides), TOML)


def _overridden(values: dict, overrides: dict | None) -> dict:
    """`values` with `overrides` in their place; an override of None removes the key (its default)."""
    values = dict(values)
    for key, value in (overrides or {}).items():
        values.pop(key, None)
        if value is not None:
            values[key] = value
    return values


def form_values_of_toml(text: str) -> dict:
    """The form's values for a config file (a run's config.toml, to clone it), unvalidated: the run's data
    may have moved since, which the form then says."""
    return form_values(TrainConfig(**parse_toml(text, TOML)))


def form_values(config: TrainConfig) -> dict:
    """The form's values that give back `config` (to clone a run): bools as bools, unset as "", a list one
    entry a line, numbers as their text."""
    values = {}
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if value is None:
            values[f.name] = ""
        elif isinstance(value, (bool, str)):
            values[f.name] = value
        elif isinstance(value, list):
            values[f.name] = "\n".join(value)
        else:
            values[f.name] = repr(value)  # repr: a float's shortest text that reads back to it exactly
    return values
