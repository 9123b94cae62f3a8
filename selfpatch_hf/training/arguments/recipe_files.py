"""Recipe files and command lines of the training scripts, parsed into argument dataclasses by `HfArgumentParser`.

A script's command line is `[RECIPE.yaml|json] [--option value ...]`. The recipe (a mapping of option: value; YAML
is a superset of JSON) is turned into command-line tokens, so that every value of the file is typed and checked
exactly like the same option on the command line; options after it override the file. Mistakes raise
`selfpatch_hf.cli.errors.UsageError` (exit status 2, one line naming the file or option and the fix).

Importing this module loads no torch, transformers, datasets or model code. Parsing uses transformers' public
`HfArgumentParser`, imported on first use: `import transformers` indexes the library's models (about a second on a
quiet machine, no torch), which `--help` pays, while argument mistakes found by the recipe file's own checks answer
before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from selfpatch_hf.cli.errors import UsageError

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def option(default: Any = None, help: str = "", *, default_factory: Any = dataclasses.MISSING) -> Any:  # noqa: A002
    """A dataclass field with its help text; the default is appended to the help unless it is None or the text
    already says what the default means (so `--help` states each default once)."""
    shown = default_factory() if default_factory is not dataclasses.MISSING else default
    if shown is not None and "default" not in help:
        help = f"{help} (default: {shown})"
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@functools.cache
def recipe_argument_parser_class() -> type:
    """`RecipeArgumentParser`: transformers' `HfArgumentParser` whose mistakes raise `UsageError` (argparse's
    documented `error` hook) instead of exiting, so that a recipe file's mistakes can name the file. The
    description keeps its line breaks (usage examples). Built on first use (see the module docstring)."""
    from transformers import HfArgumentParser

    class RecipeArgumentParser(HfArgumentParser):
        def __init__(self, argument_classes: Sequence[type], description: str | None = None):
            super().__init__(
                argument_classes,
                description=description,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )

        def error(self, message: str):
            raise UsageError(message)

    return RecipeArgumentParser


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads exponent floats without a dot (`1e-30`, `1e38`) as numbers, as YAML 1.2
    and JSON do: PyYAML follows YAML 1.1, where they are strings, so `drop_path_rate: 1e-30` would be refused as
    "not a number"."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """`text` read as YAML with `RecipeLoader` (a `yaml.YAMLError` on a syntax error)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 -- a SafeLoader subclass: builds plain values only


def yaml_problem(error: yaml.YAMLError) -> str:
    """`at line L, column C: PROBLEM` (or the first line of the message) of a YAML / JSON syntax error."""
    mark = getattr(error, "problem_mark", None)
    where = f"at line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(error, "problem", None) or str(error).splitlines()[0])


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of a YAML or JSON recipe file."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise UsageError(f"cannot read the recipe file {path}: {error.strerror or error}.") from None
    try:
        recipe = load_yaml(text)
    except yaml.YAMLError as error:
        raise UsageError(
            f"{path} is not valid YAML/JSON {yaml_problem(error)}. Fix the file (a mapping of option: value)."
        ) from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise UsageError(
            f"{path} holds a {type(recipe).__name__}, not a mapping of option: value (e.g. `learning_rate: 5e-4`)."
        )
    return recipe


def recipe_tokens(
    recipe: dict[str, Any], argument_classes: Sequence[type], path: str, script: str
) -> list[str]:
    """A recipe mapping as command-line tokens (booleans as true/false, lists as several values)."""
    known = {item.name for group in argument_classes for item in dataclasses.fields(group)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise UsageError(f"{path}: unknown option(s) {unknown}. See `python {script} --help`.")
    tokens: list[str] = []
    for key, value in recipe.items():
        if value is None:
            continue
        if isinstance(value, dict):
            raise UsageError(f"{path}: option {key!r} takes a value or a list, not a mapping.")
        if isinstance(value, bool):
            value = str(value).lower()
        values = value if isinstance(value, (list, tuple)) else [value]
        tokens += [f"--{key}", *(str(item) for item in values)]
    return tokens


@dataclasses.dataclass
class ParsedCommandLine:
    groups: tuple[Any, ...]  # one instance per argument class, in order
    recipe_path: str | None = None
    set_aside: dict[str, Any] = dataclasses.field(default_factory=dict)  # recipe entries parsed by the caller


def parse_recipe_and_command_line(
    argument_classes: Sequence[type],
    argv: Sequence[str],
    *,
    script: str,
    description: str | None = None,
    set_aside: Sequence[str] = (),
) -> ParsedCommandLine:
    """Parses `[RECIPE.yaml|json] [--option value ...]` into `argument_classes`. Recipe entries named in
    `set_aside` (values with a richer form in a file, e.g. a mapping) are returned as they are, for the caller.
    `--help` prints the options and exits (SystemExit 0)."""
    argv = list(argv)
    parsed = ParsedCommandLine(groups=())
    tokens: list[str] = []
    if argv and argv[0].endswith(RECIPE_SUFFIXES):
        parsed.recipe_path = argv.pop(0)
        recipe = read_recipe(parsed.recipe_path)
        parsed.set_aside = {key: recipe.pop(key) for key in set_aside if key in recipe}
        tokens = recipe_tokens(recipe, argument_classes, parsed.recipe_path, script)
    parser = recipe_argument_parser_class()(argument_classes, description)
    if parsed.recipe_path is not None:
        try:  # the file alone first, so that its mistakes name it
            parser.parse_args_into_dataclasses(args=tokens, look_for_args_file=False)
        except UsageError as error:
            raise UsageError(f"{parsed.recipe_path}: {error}") from None
    try:
        parsed.groups = parser.parse_args_into_dataclasses(args=tokens + argv, look_for_args_file=False)
    except ValueError as error:  # unknown options
        raise UsageError(f"{error}. See `python {script} --help`.") from None
    check_finite_numbers(parsed.groups)
    return parsed


def check_finite_numbers(groups: Sequence[Any]) -> None:
    """No option takes NaN or an infinity (`--epochs inf`, `--clip_grad nan`): argparse's `float` accepts them, and
    they would fail far from the option (a schedule's `int()`, a NaN gradient many steps later) or silently turn a
    setting off (every comparison with NaN is false)."""
    for group in groups:
        for item in dataclasses.fields(group):
            value = getattr(group, item.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(number, float) and not math.isfinite(number) for number in values):
                raise UsageError(f"--{item.name} must be a finite number, got {value}.")


def check_trackers_installed(report_to: str) -> None:
    """`--report_to wandb` / `tensorboard` needs that package: said before any model or data is loaded."""
    for tracker in ("wandb", "tensorboard"):
        if report_to == tracker and importlib.util.find_spec(tracker) is None:
            raise UsageError(f"--report_to {tracker} needs `pip install {tracker}`.")


def check_no_unresumed_run(
    output_dir: str | os.PathLike, resume: str | None, overwrite_output_dir: bool
) -> None:
    """An `output_dir` that holds checkpoints of a run is continued (`--resume_from_checkpoint`) or started afresh
    (`--overwrite_output_dir`) only when asked: never silently mixed with a new run."""
    from selfpatch_hf.training.checkpointing import (  # loads torch: not needed for --help
        CHECKPOINTS_DIRNAME,
        list_checkpoints,
    )

    checkpoints = list_checkpoints(Path(output_dir) / CHECKPOINTS_DIRNAME)
    if checkpoints and not resume and not overwrite_output_dir:
        raise UsageError(
            f"{output_dir} already holds checkpoints of a run (latest: {checkpoints[-1].name}). Pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to start afresh, or another "
            "--output_dir."
        )


__all__ = [
    "RECIPE_SUFFIXES",
    "ParsedCommandLine",
    "RecipeLoader",
    "check_finite_numbers",
    "check_no_unresumed_run",
    "check_trackers_installed",
    "option",
    "parse_recipe_and_command_line",
    "load_yaml",
    "read_recipe",
    "recipe_argument_parser_class",
    "recipe_tokens",
    "yaml_problem",
]
