"""Command-line options generated from an evaluation's settings dataclass (`selfpatch_hf.evaluation.configs`).

Each field becomes one option: `--field-name` (or the field's `option` metadata), typed by the field's annotation
(`int`, `float`, `str`, `X | None`, a `Literal` of choices), with the field's default and its `help` metadata. A
boolean field becomes a flag that switches it away from its default (`--reduce-labels` for a False default,
`--no-channel-norm` for `normalize_channels=True`). The defaults thus live in the dataclass only, and what the
library does by default is what the command does.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal

from selfpatch_hf.cli.errors import UsageError
from selfpatch_hf.evaluation.configs import SettingError


def option_name(field: dataclasses.Field) -> str:
    return field.metadata.get("option") or "--" + field.name.replace("_", "-")


def _value_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(the type that parses one value, the allowed choices or None) of a field's annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    return annotation, None


def add_config_options(
    parser: argparse.ArgumentParser,
    config_class: type,
    *,
    exclude: tuple[str, ...] = (),
    title: str | None = None,
) -> None:
    """Adds one option per field of the dataclass `config_class` (except `exclude`), in a group named `title`."""
    group = parser.add_argument_group(title or f"settings ({config_class.__name__})")
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name in exclude:
            continue
        help_text = field.metadata.get("help")
        if not help_text:
            raise TypeError(f"{config_class.__name__}.{field.name} has no help text (metadata 'help').")
        kind, choices = _value_type(hints[field.name])
        if kind is bool:
            action = "store_false" if field.default else "store_true"
            group.add_argument(option_name(field), dest=field.name, action=action, help=help_text)
            continue
        group.add_argument(
            option_name(field),
            dest=field.name,
            type=kind,
            choices=choices,
            default=field.default,
            metavar=None if choices else field.name.upper(),
            help=help_text,
        )


def config_from_args(config_class: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """The `config_class` instance the parsed options describe (`fixed`: fields the command sets itself); a value
    the protocol refuses is a `UsageError` naming the option."""
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name) and name not in fixed}
    try:
        return config_class(**values, **fixed)
    except SettingError as error:
        field = fields[error.field]
        raise UsageError(f"{option_name(field)} must {error.requirement}, got {error.value!r}.") from None


__all__ = ["add_config_options", "config_from_args", "option_name"]
