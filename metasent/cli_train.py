"""``metasent train``'s options, generated from :class:`metasent.meta.config.TrainingArguments`
(names, defaults and help from its fields), so the command cannot drift from the configuration it
builds; and the reading of its ``--config`` file and ``--set`` overrides into one
``TrainingArguments``. Imported on first use of ``train``: the fields' module imports torch, which
the client commands do without.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic import ValidationError

from metasent.cli_common import split
from metasent.meta.algorithms import specs
from metasent.meta.config import TrainingArguments
from metasent.meta.resolve import ArgumentError, check_algorithm, messages

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo


def option_name(field: str) -> str:
    """The option of a :class:`TrainingArguments` field: ``inner_steps`` -> ``--inner-steps``."""
    return "--" + field.replace("_", "-")


def _is_list(info: FieldInfo) -> bool:
    return get_origin(info.annotation) is list


def _per_algorithm(name: str, default: Any) -> str:
    """`` (default: balanced; matching: natural)`` when an algorithm's spec sets its own default
    for field ``name`` (its help then shows no single ``[default: ...]``), else ``""``."""

    def show(value: Any) -> str:
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    defaults = [f"{s.name}: {show(s.training_defaults[name])}" for s in specs().values() if name in s.training_defaults]
    return f" (default: {show(default)}; {', '.join(defaults)})" if defaults else ""


def _option(name: str, info: FieldInfo) -> inspect.Parameter:
    """The ``metasent train`` option of a :class:`TrainingArguments` field: its name, default
    and description; lists are comma-separated, literals a choice (an Enum, which every typer
    version takes)."""
    annotation: Any = info.annotation
    default: Any = None if info.is_required() else info.get_default(call_default_factory=True)
    per_algorithm = _per_algorithm(name, default)
    help_text = (info.description or "") + per_algorithm
    if name == "algorithm":  # a choice of the registered names (plug-ins included)
        help_text += ": " + "; ".join(f"{s.name}: {s.description}" for s in specs().values())
        algorithms: Any = enum.Enum(name, {s: s for s in specs()}, type=str)  # type: ignore[misc]
        annotation, default = algorithms, algorithms(default)
    if info.is_required():
        annotation = annotation | None
        help_text += " (required, here or in --config)"
    elif _is_list(info):
        annotation, default = (str, ",".join(default)) if default else (str | None, None)  # none: no [default: ]
        help_text += " (comma-separated)"
    elif get_origin(annotation) is Literal:
        choices: Any = enum.Enum(name, {str(v): str(v) for v in get_args(annotation)}, type=str)  # type: ignore[misc]
        annotation, default = choices, choices(default)
    option = typer.Option(help=help_text, show_default=not per_algorithm)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )


_CONFIG_HELP = (
    "JSON or TOML file of training arguments (the options' names with '_', e.g. outer_steps = 500); "
    "options on the command line and --set override it"
)
_SET_HELP = "KEY=VALUE: set one training argument (e.g. save_every=50, val_domains=music,video); repeatable, wins last"


def _required_first(fields: dict[str, FieldInfo]) -> list[tuple[str, FieldInfo]]:
    return sorted(fields.items(), key=lambda item: not item[1].is_required())


def train_command(train: Callable[[TrainingArguments], None]) -> Any:
    """``metasent train`` with one option per :class:`TrainingArguments` field, calling ``train``
    with the arguments read from the command line (:func:`training_arguments`)."""
    parameters = [
        inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, typer.Option("--config", help=_CONFIG_HELP)],
        ),
        inspect.Parameter(
            "set_",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)],
        ),
        *(_option(name, info) for name, info in _required_first(TrainingArguments.model_fields)),
    ]

    @functools.wraps(train)
    def command(ctx: typer.Context, config: Path | None = None, set_: list[str] | None = None, **options: Any) -> None:
        train(training_arguments(ctx, config, set_ or [], options))

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    del command.__wrapped__  # typer reads the signature above, not train's
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command("train")(command)
    return typer.main.get_command(single)


def _read_config(path: Path) -> dict[str, Any]:
    """A ``--config`` file: a JSON object, or TOML (``.toml``)."""
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # Python 3.10
                import tomli as tomllib

            return tomllib.loads(text)
        values = json.loads(text)
    except (OSError, ValueError) as error:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise typer.BadParameter(str(error), param_hint="--config") from error
    if not isinstance(values, dict):
        raise typer.BadParameter("expected a JSON object of training arguments", param_hint="--config")
    return values


def _set_value(info: FieldInfo, value: str) -> Any:
    """A ``--set`` value: comma-separated for lists, ``none``/``null`` for an optional field's
    ``None``; other strings are converted by the field's type (``"25"``, ``"true"``, ``"2e-5"``)."""
    if _is_list(info):
        return split(value) or []
    if value.strip().lower() in ("none", "null") and not info.is_required() and info.default is None:
        return None
    return value


def training_arguments(
    ctx: typer.Context, config: Path | None, overrides: list[str], options: dict[str, Any]
) -> TrainingArguments:
    """The run's :class:`TrainingArguments`: the ``--config`` file, then the options given on the
    command line, then ``--set``; what none of them sets keeps its default (the algorithm's where
    it has one), so ``model_fields_set`` is exactly what the user chose."""
    fields = TrainingArguments.model_fields
    values = _read_config(config) if config is not None else {}
    for name, value in options.items():
        source = ctx.get_parameter_source(name)  # typer may vendor click: compare by name
        if source is not None and source.name != "DEFAULT":
            if isinstance(value, enum.Enum):
                value = value.value
            values[name] = (split(value) or []) if _is_list(fields[name]) else value
    for item in overrides:
        key, equals, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or key not in fields:
            message = f"expected KEY=VALUE with KEY one of {', '.join(fields)}; got {item!r}"
            raise typer.BadParameter(message, param_hint="--set")
        values[key] = _set_value(fields[key], value)
    try:
        args = TrainingArguments.model_validate(values)
        check_algorithm(args.algorithm)
    except ValidationError as error:
        field = next((str(e["loc"][0]) for e in error.errors() if e["loc"]), "")
        hint = option_name(field) if field in fields else "--config"
        raise typer.BadParameter(messages(error), param_hint=hint) from error
    except ArgumentError as error:
        raise typer.BadParameter(str(error), param_hint=option_name(error.argument)) from error
    return args
