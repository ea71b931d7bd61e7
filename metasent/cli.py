"""The ``metasent`` command line: ``train``, ``evaluate``, ``serve``, ``speed``, ``benchmark``,
``adapt``, ``classify`` and ``db upgrade``.

``train``'s options are generated from :class:`metasent.meta.config.TrainingArguments` (names,
defaults and help from its fields), so the command cannot drift from the configuration it builds;
the command is built on first use, because that import pulls in torch, which the client commands
(``adapt``, ``classify``) do without.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

import typer
from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:
    import torch
    from pydantic import ValidationError
    from pydantic.fields import FieldInfo

    from metasent.meta.config import InnerLoopConfig, TrainingArguments
    from metasent.meta.model import MetaLearner

logger = logging.getLogger("metasent")


class _Commands(TyperGroup):
    """The command group; ``train`` is built when first asked for (see the module docstring) and
    listed first."""

    lazy = "train"

    def list_commands(self, ctx: Any) -> list[str]:
        return [self.lazy, *(name for name in super().list_commands(ctx) if name != self.lazy)]

    _listing = False  # True while the group's own help is written

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True  # `metasent --help` lists train by its docstring, without importing torch
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name == self.lazy and self._listing:
            return TyperCommand(self.lazy, help=inspect.getdoc(train))
        if cmd_name == self.lazy:  # built each time: algorithms registered since then are choices too
            return _train_command()
        return super().get_command(ctx, cmd_name)


cli = typer.Typer(
    cls=_Commands,
    help="metasent: meta-train a BERT encoder across sentiment domains (matching networks by default; "
    "first-order MAML, Reptile, prototypical networks and more), evaluate it on few-shot tasks, and serve "
    "K-shot adaptation to new domains over REST.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _from_bench(module: str, *names: str) -> Any:
    """Names from the repository's ``bench/`` package, which is not installed: it is imported from
    the current folder when that is a checkout (a console script does not put the current folder
    on ``sys.path``); a clear error otherwise. One name is returned as is, several as a tuple."""
    import importlib

    checkout = str(Path.cwd())
    if (Path(checkout) / "bench" / "__init__.py").is_file() and checkout not in sys.path:
        sys.path.insert(0, checkout)
    try:
        loaded = importlib.import_module(f"bench.{module}")
    except ModuleNotFoundError as error:
        if error.name not in ("bench", f"bench.{module}"):
            raise
        typer.echo(
            "error: the benchmarks live in the repository's bench/ folder, which is not installed: "
            "run this command from the root of a metasent checkout (git clone, then the README's set-up command)",
            err=True,
        )
        raise typer.Exit(2) from None
    values = tuple(getattr(loaded, name) for name in names)
    return values[0] if len(values) == 1 else values


def _setup(threads: int | None, log_level: str = "INFO") -> None:
    import os

    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 logs, the others only warn
        log_level = "WARNING"
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _split(values: str | None) -> list[str] | None:
    return [v.strip() for v in values.split(",") if v.strip()] if values else None


def _read_tasks(data: str, include: list[str] | None = None, exclude: list[str] | None = None):
    from metasent.data.readers import read_arsc, read_table
    from metasent.data.registry import TaskRegistry

    path = Path(data)
    tasks = read_arsc(path) if path.is_dir() and any(path.glob("*.t[245].*")) else read_table(data)
    return TaskRegistry(tasks).select(include=include, exclude=exclude)


def _extra_tasks(sources: list[str]):
    """Tasks of ``--extra-data``: each JSONL/CSV file, or every ``*.jsonl``/``*.csv`` file of a
    folder, one task per domain (their rows are the ``train`` split).

    Raises:
        typer.BadParameter: naming ``--extra-data`` for a missing path or a folder with no such file.
    """
    from metasent.data.readers import read_table
    from metasent.data.registry import TaskRegistry

    files: list[Path] = []
    for source in sources:
        path = Path(source)
        found = sorted([*path.glob("*.jsonl"), *path.glob("*.csv")]) if path.is_dir() else [path]
        if not found or not all(f.is_file() for f in found):
            raise typer.BadParameter(f"{source}: no JSONL or CSV file there", param_hint="--extra-data")
        files += found
    return TaskRegistry([task for file in files for task in read_table(str(file))])


def _read_extra(sources: list[str], exclude: list[str]):
    """The meta-training tasks of ``--extra-data`` (see :func:`_extra_tasks`), less ``exclude``."""
    return _extra_tasks(sources).select(exclude=exclude).select(require_split="train")


def _validation_tasks(data: str, extra: list[str], val: list[str], val_split: str) -> list:
    """Validation tasks: the ``val`` domains of ``data`` (their ``val_split``), and those of the
    extra data (a domain held out of meta-training whole: all its rows form ``val_split``).

    Raises:
        typer.BadParameter: naming ``--val-domains`` for a domain found in neither.
    """
    from metasent.data.registry import Task

    main = _read_tasks(data)
    tasks = list(main.select(include=[d for d in val if d in main.domains], require_split=val_split))
    rest = [d for d in val if d not in main.domains]
    if rest:
        try:
            held = _extra_tasks(extra).select(include=rest) if extra else None
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--val-domains") from error
        if held is None:
            raise typer.BadParameter(f"unknown domains {rest}", param_hint="--val-domains")
        tasks += [Task(t.name, t.domain, t.labels, {val_split: t.split("train")}) for t in held]
    return tasks


def _option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _messages(error: ValidationError) -> str:
    return "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())


_INNER_OPTIONS = {
    "steps": "--inner-steps",
    "lr": "--inner-lr",
    "adapted_layers": "--adapted-layers",
    "classifier": "--classifier",
    "label_anchors": "--label-anchors",
}


def _inner_loop(
    base: InnerLoopConfig,
    steps: int | None,
    lr: float | None,
    adapted_layers: int | None,
    classifier: str | None = None,
    label_anchors: bool | None = None,
) -> InnerLoopConfig:
    """The one reader of ``--inner-steps``, ``--inner-lr`` and ``--adapted-layers`` (``train`` and
    ``evaluate``), and of ``evaluate``'s ``--classifier`` and ``--label-anchors``: ``base`` with the
    given ones replaced and validated again.

    Raises:
        typer.BadParameter: naming the option, e.g. ``--inner-steps`` with the matching
            classifier, which takes no gradient step.
    """
    from pydantic import ValidationError

    from metasent.meta.config import override_inner_loop

    given = {
        "steps": steps,
        "lr": lr,
        "adapted_layers": adapted_layers,
        "classifier": classifier,
        "label_anchors": label_anchors,
    }
    try:
        return override_inner_loop(base, **given)
    except ValidationError as error:
        locations = [e["loc"][0] for e in error.errors() if e["loc"]]
        field = next(iter(locations), None) or next((k for k, v in given.items() if v is not None), "steps")
        raise typer.BadParameter(
            _messages(error), param_hint=_INNER_OPTIONS.get(str(field), "--inner-steps")
        ) from error


# ---------------------------------------------------------------------------------------- train


def _is_list(info: FieldInfo) -> bool:
    return get_origin(info.annotation) is list


def _per_algorithm(name: str, default: Any) -> str:
    """`` (default: balanced; matching: natural)`` when an algorithm's spec sets its own default
    for field ``name`` (its help then shows no single ``[default: ...]``), else ``""``."""
    from metasent.meta.algorithms import specs

    def show(value: Any) -> str:
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    defaults = [f"{s.name}: {show(s.training_defaults[name])}" for s in specs().values() if name in s.training_defaults]
    return f" (default: {show(default)}; {', '.join(defaults)})" if defaults else ""


def _option(name: str, info: FieldInfo) -> inspect.Parameter:
    """The ``metasent train`` option of a :class:`TrainingArguments` field: its name, default
    and description; lists are comma-separated, literals a choice (an Enum, which every typer
    version takes)."""
    from metasent.meta.algorithms import specs

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


def _train_command() -> Any:
    """``metasent train`` with one option per :class:`TrainingArguments` field."""
    from metasent.meta.config import TrainingArguments

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
        train(_training_arguments(ctx, config, set_ or [], options))

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
        return _split(value) or []
    if value.strip().lower() in ("none", "null") and not info.is_required() and info.default is None:
        return None
    return value


def _training_arguments(
    ctx: typer.Context, config: Path | None, overrides: list[str], options: dict[str, Any]
) -> TrainingArguments:
    """The run's :class:`TrainingArguments`: the ``--config`` file, then the options given on the
    command line, then ``--set``; what none of them sets keeps its default (the algorithm's where
    it has one), so ``model_fields_set`` is exactly what the user chose."""
    from pydantic import ValidationError

    from metasent.meta.config import TrainingArguments

    fields = TrainingArguments.model_fields
    values = _read_config(config) if config is not None else {}
    for name, value in options.items():
        source = ctx.get_parameter_source(name)  # typer may vendor click: compare by name
        if source is not None and source.name != "DEFAULT":
            if isinstance(value, enum.Enum):
                value = value.value
            values[name] = (_split(value) or []) if _is_list(fields[name]) else value
    for item in overrides:
        key, equals, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or key not in fields:
            message = f"expected KEY=VALUE with KEY one of {', '.join(fields)}; got {item!r}"
            raise typer.BadParameter(message, param_hint="--set")
        values[key] = _set_value(fields[key], value)
    try:
        return TrainingArguments.model_validate(values)
    except ValidationError as error:
        field = next((str(e["loc"][0]) for e in error.errors() if e["loc"]), "")
        hint = _option_name(field) if field in fields else "--config"
        raise typer.BadParameter(_messages(error), param_hint=hint) from error


def _init_from(model: MetaLearner, source: str, device: torch.device) -> None:
    """Load ``source``'s meta-learned tensors into ``model`` (prepared for this run's inner loop).

    Inner learning rates the source has for tensors this run does not adapt are dropped; tensors
    the source lacks (new adapters or Meta-SGD rates) keep their fresh values.

    Raises:
        typer.BadParameter: when the source has other tensors than the model (another encoder or
            LoRA layout), or shapes differ.
    """
    from metasent.meta.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(source)
    if path is None:
        raise typer.BadParameter("give a checkpoint directory or 'default'", param_hint="--init-from")
    loaded, _ = load_checkpoint(path, device)
    own = model.state_dict()
    tensors = {n: t for n, t in loaded.state_dict().items() if n in own or "inner_log_lr" not in n}
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as error:  # a shape differs: another LoRA rank or encoder
        raise typer.BadParameter(f"{path} does not fit this run's model: {error}", param_hint="--init-from") from error
    if unexpected:
        raise typer.BadParameter(
            f"{path} has tensors this run's model lacks (another encoder or LoRA layout?): {unexpected[:3]}",
            param_hint="--init-from",
        )
    logger.info("meta-parameters from %s; fresh: %s", path, ", ".join(missing) or "none")


_RESUME_OPTIONS = ("outer_steps", "max_minutes", "eval_every", "save_every")
"""The options that still apply with ``--resume`` (the checkpoint's other settings do)."""


def train(args: TrainingArguments) -> None:
    """Meta-train: sample N-way K-shot episodes from the training domains, adapt on each support
    set (inner loop), update the meta-parameters (outer loop, AdamW). Validates every --eval-every
    steps and keeps the best. --algorithm picks the method (default: FOMAML with Meta-SGD rates over
    LoRA adapters, label anchors and natural-proportion query sets). --resume goes on with a run's
    own settings; --init-from starts a new run, with these settings, from a model's meta-parameters.
    Every option can also come from a --config file or --set KEY=VALUE. Under torchrun
    (`torchrun --nproc-per-node N -m metasent.cli train ...`) the meta-batch is split over the N
    processes (README, "Distributed meta-training")."""
    _setup(args.threads)
    from metasent.meta import distributed

    env = distributed.environment()
    if env.world_size > 1:
        try:
            distributed.check_meta_batch(args.meta_batch_size, env.world_size)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--meta-batch-size") from error
    _, torch_device = distributed.setup(args.device)
    try:
        _train(args, torch_device, env.is_main)
    finally:
        distributed.teardown()


def _train(args: TrainingArguments, torch_device: Any, is_main: bool) -> None:
    """:func:`train` in this process (one rank of a distributed run, or the only process)."""
    import torch

    from metasent.meta.algorithms import get
    from metasent.meta.checkpoint import load_checkpoint, load_training_state, save_checkpoint
    from metasent.meta.model import MetaLearner
    from metasent.meta.train import meta_train

    inner = _inner_loop(args.base_inner_loop(), args.inner_steps, args.inner_lr, args.adapted_layers)
    torch.manual_seed(args.seed)  # the initial LoRA tensors, the same in every run of a seed
    if args.resume is not None:  # a 'last' checkpoint, or a compact model (fresh optimiser state)
        model, config = load_checkpoint(args.resume, torch_device)
        state = load_training_state(args.resume)
        if config.training is not None:  # how long to go on and how often to validate may change
            longer = {k: getattr(args, k) for k in _RESUME_OPTIONS if k in args.model_fields_set}
            config.training = config.training.model_copy(update=longer)
    else:
        config = args.checkpoint_config(inner)
        model = MetaLearner.from_pretrained(config.encoder).prepare(config.inner_loop).to(torch_device)
        state = None
        if args.init_from is not None:
            _init_from(model, args.init_from, torch_device)
    # the run's own held-out and validation domains (a resumed run keeps those it started with)
    held_out = config.training.exclude_domains if config.training else args.exclude_domains
    val = config.training.val_domains if config.training else args.val_domains
    train_tasks = _read_tasks(args.data, exclude=held_out + val).select(require_split="train")
    val_split = config.training.val_split if config.training else args.val_split
    extra = args.extra_data or (config.training.extra_data if config.training else [])
    val_tasks = _validation_tasks(args.data, extra, val, val_split) if val else []
    if extra:
        from metasent.data.registry import TaskRegistry

        try:
            train_tasks = TaskRegistry([*train_tasks, *_read_extra(extra, exclude=held_out + val)])
        except ValueError as error:  # a domain of the extra data repeats one of --data
            raise typer.BadParameter(str(error), param_hint="--extra-data") from error
    if not get(config.algorithm).meta_trained:  # transfer learning: nothing to meta-train
        config.training = None
        if is_main:
            for name in ("best", "last"):
                save_checkpoint(args.output / name, model, config)
            typer.echo(json.dumps({"algorithm": config.algorithm, "checkpoint": str(args.output / "best")}))
        return
    logger.info("training tasks: %s", ", ".join(t.name for t in train_tasks))
    final = meta_train(model, list(train_tasks), list(val_tasks), config, args.output, state, args.progress)
    if is_main:
        typer.echo(json.dumps({k: v for k, v in final.metrics.items() if k not in ("curve",)}, indent=2))


@cli.command()
def evaluate(
    data: Annotated[str, typer.Option(help="ARSC directory, or a JSONL/CSV/HF dataset")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint directory; omit for the un-meta-trained encoder (baseline)"),
    ] = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder for the baseline (default all-MiniLM-L6-v2)")] = None,
    algorithm: Annotated[
        str,
        typer.Option(
            help="Without --checkpoint: an algorithm that is not meta-trained, e.g. 'none' (head-only inner "
            "loop) or 'finetune' (every tensor adapted)"
        ),
    ] = "none",
    domains: Annotated[
        str | None,
        typer.Option(help="Comma-separated domains to evaluate (default: ARSC's 4 target domains)"),
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            help="'fixed': support = --support-split file, query = --query-split file; "
            "'sampled': K-shot episodes over --seeds"
        ),
    ] = "fixed",
    support_split: str = "train",
    query_split: str = "test",
    k_shot: int = 5,
    seeds: Annotated[int, typer.Option(help="Sampled episodes per task (seeds 0..n-1)")] = 5,
    inner_steps: Annotated[int | None, typer.Option(help="Override the inner-loop steps")] = None,
    inner_lr: Annotated[float | None, typer.Option(help="Override the inner learning rate")] = None,
    adapted_layers: Annotated[int | None, typer.Option(help="Override the adapted layers")] = None,
    max_length: Annotated[int | None, typer.Option(help="Override tokens per text")] = None,
    classifier: Annotated[
        str | None,
        typer.Option(help="Override the head built from the support set: 'prototype' or 'matching'"),
    ] = None,
    label_anchors: Annotated[
        bool | None,
        typer.Option("--label-anchors/--no-label-anchors", help="Override whether label names join their class"),
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write the results as JSON here")] = None,
    batch_size: int = 64,
    device: str = "auto",
    threads: int | None = None,
    estimate: Annotated[
        bool,
        typer.Option(
            help="Also make the server's accuracy estimate at each adaptation and report its error, interval "
            "coverage and cost"
        ),
    ] = False,
) -> None:
    """Meta-test: adapt on each task's support set with the checkpoint's inner loop and score
    the query set. Prints per-task accuracy and macro-F1 (percent) and their mean, with 95%
    confidence intervals for sampled episodes, and the calibration error of the scores."""
    _setup(threads)
    from metasent.data.readers import arsc_target_domains
    from metasent.meta.checkpoint import load_model
    from metasent.meta.evaluate import evaluate_tasks, format_table, summarize
    from metasent.meta.model import resolve_device

    try:
        model, config = load_model(checkpoint, encoder, resolve_device(device), algorithm)
    except ValueError as error:
        if checkpoint is not None:
            raise
        raise typer.BadParameter(str(error), param_hint="--algorithm") from error
    inner = _inner_loop(config.inner_loop, inner_steps, inner_lr, adapted_layers, classifier, label_anchors)
    if max_length is not None:
        model.encoder_config = model.encoder_config.model_copy(update={"max_length": max_length})
    include = _split(domains) or (arsc_target_domains(data) if Path(data, "workspace.target.list").exists() else None)
    tasks = list(_read_tasks(data, include=include))
    results = evaluate_tasks(
        model, tasks, inner, protocol, support_split, query_split, k_shot, seeds, batch_size, estimate
    )
    summary = summarize(results)
    summary["config"] = {
        "checkpoint": str(checkpoint) if checkpoint else None,
        "algorithm": config.algorithm,
        "encoder": config.encoder.name_or_path,
        "max_length": model.max_length(),
        "inner_loop": inner.model_dump(),
        "protocol": protocol,
        "support_split": support_split,
        "query_split": query_split,
        "k_shot": k_shot if protocol == "sampled" else None,
        "seeds": seeds if protocol == "sampled" else None,
    }
    model_name = checkpoint or f"un-meta-trained {config.encoder.name_or_path}"
    title = f"{model_name} ({protocol}, {support_split}->{query_split})"
    typer.echo(format_table(summary, title))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(summary, indent=2))


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (METASENT_HOST, default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (METASENT_PORT, default 8000)")] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            help="The model (METASENT_CHECKPOINT): default, the meta-trained model shipped in the package; "
            "none, the un-meta-trained encoder; or a checkpoint directory  [default: default]"
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda (METASENT_DEVICE)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (METASENT_THREADS)")] = None,
) -> None:
    """Start the REST server: POST /v1/domains adapts a domain from a support set with the
    checkpoint's inner loop; POST /v1/domains/{id}/classify classifies texts; PUT
    /v1/domains/{id}/examples updates a support set; POST /v1/classify adapts and classifies
    without storing. Domains persist in METASENT_DATA_DIR (SQLite) or METASENT_DATABASE_URL;
    METASENT_API_KEYS turns on API keys. /healthz, /readyz and /metrics for operators. Docs at /docs,
    a playground page at /."""
    import uvicorn

    from metasent.app.main import create_app
    from metasent.app.observability import configure_logging
    from metasent.app.server import uvicorn_config
    from metasent.app.settings import Settings

    overrides = {"host": host, "port": port, "checkpoint": checkpoint, "device": device, "threads": threads}
    settings = Settings.model_validate({k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.log_level, settings.log_format)  # one place, before uvicorn starts
    _setup(settings.threads, settings.log_level)
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:  # the port was taken or the app failed to start: exit non-zero as uvicorn.run does
        raise typer.Exit(3)


@cli.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A training run's checkpoint directory, e.g. runs/fomaml/best")],
    output: Annotated[Path, typer.Option(help="The compact model's directory")] = Path("metasent/models/default"),
    name: Annotated[str | None, typer.Option(help="The model's name, shown by /healthz")] = None,
    inner_steps: Annotated[
        int | None, typer.Option(help="Inner-loop steps the model is served with (default: as trained)")
    ] = None,
) -> None:
    """Write a training run's checkpoint as a compact model: its config and a safetensors file of
    the meta-learned tensors only (LoRA adapters, temperature, anchor weight, inner learning
    rates; at most 8 MiB), loaded over the base encoder from its package. With no --output it
    rebuilds the shipped default model, metasent/models/default, in a checkout."""
    _setup(None)
    from metasent.meta.checkpoint import CONFIG_FILE, export_model, model_fingerprint
    from metasent.meta.config import CheckpointConfig

    try:
        directory = export_model(
            checkpoint, output, name=name or "metasent-" + checkpoint.resolve().parent.name, inner_steps=inner_steps
        )
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="CHECKPOINT") from error
    config = CheckpointConfig.model_validate_json((directory / CONFIG_FILE).read_text())
    size = sum(f.stat().st_size for f in directory.iterdir())
    summary = {"model": config.name, "output": str(directory), "bytes": size}
    summary["sha256"] = model_fingerprint(directory, config)
    typer.echo(json.dumps(summary, indent=2))


@cli.command()
def speed(
    data: Annotated[
        str, typer.Option(help="ARSC directory (support and query texts come from it)")
    ] = "../shared/data/arsc",
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint; omit for the un-meta-trained encoder")] = None,
    device: str = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (here and in the server)")] = None,
    repeats: Annotated[int, typer.Option(help="Adaptations timed (median)")] = 10,
    texts: Annotated[int, typer.Option(help="Texts classified")] = 1000,
    batch_size: int = 32,
    padded_length: Annotated[int, typer.Option(help="Fixed length of the file-order reference")] = 256,
    train_steps: Annotated[int, typer.Option(help="Outer steps timed per meta-training variant")] = 3,
    http: Annotated[bool, typer.Option(help="Also start a server for the HTTP and memory figures")] = True,
    clients: int = 8,
    requests: Annotated[int, typer.Option(help="Classify requests per client")] = 10,
    per_request: Annotated[int, typer.Option(help="Texts per classify request")] = 8,
    domains: Annotated[int, typer.Option(help="Domains adapted for the memory figure")] = 100,
    port: int = 8790,
    output: Annotated[Path | None, typer.Option(help="Write the figures as JSON here")] = None,
) -> None:
    """Measure adaptation seconds, classification and HTTP throughput, meta-training episodes/s
    and server memory, each with its ratio to a reference measured in the same run."""
    _setup(threads)
    run_bench = _from_bench("speed", "run_bench")

    result = run_bench(
        Path(data),
        checkpoint,
        device,
        repeats,
        texts,
        batch_size,
        padded_length,
        train_steps,
        http,
        clients,
        requests,
        per_request,
        domains,
        port,
        threads,
    )
    text = json.dumps(result, indent=2)
    typer.echo(text)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")


@cli.command("bench", hidden=True, help="Deprecated alias of `metasent speed` (same options).")
@functools.wraps(speed)
def bench(**options: Any) -> None:
    """``metasent bench``, the old name of ``metasent speed``: warns, then runs it."""
    logger.warning("`metasent bench` is deprecated and will be removed: use `metasent speed` (same options)")
    speed(**options)


@cli.command()
def benchmark(
    data: Annotated[str, typer.Option(help="ARSC directory")] = "../shared/data/arsc",
    output: Annotated[Path, typer.Option(help="Results directory")] = Path("results"),
    budget: Annotated[
        str, typer.Option(help="cpu (fits 2 CPU cores: short meta-training, 128 tokens), gpu (full), smoke")
    ] = "cpu",
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated method names (default: all): each registered algorithm (the un-meta-trained "
            "'none' as 'pretrained'), fomaml_head (FOMAML before LoRA and Meta-SGD), matching_anchors and setfit"
        ),
    ] = None,
    checkpoint: Annotated[
        list[str] | None, typer.Option(help="METHOD=DIR: load this checkpoint instead of training (repeatable)")
    ] = None,
    encoder: Annotated[str, typer.Option(help="Encoder every method starts from")] = (
        "sentence-transformers/all-MiniLM-L6-v2"
    ),
    runs: Annotated[Path, typer.Option(help="Where the benchmark's checkpoints go")] = Path("runs/benchmark"),
    label: Annotated[str | None, typer.Option(help="Suffix of the result files (default: the budget)")] = None,
    device: str = "auto",
    threads: int | None = None,
    seed: int = 0,
    suggest_methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated methods also measured on what to label next (5-shot + 5 suggested labels "
            "against + 5 random; three adaptations per episode); '' for none"
        ),
    ] = "fomaml",
) -> None:
    """Train (or load) every method and evaluate all of them on the same tasks and seeds: the 12
    ARSC test tasks, the 6 food tasks (5 seeds), accuracy against shots, and the dev tasks that
    choose the default; with each, the calibration error of its scores and how close its accuracy
    estimate at adaptation came. Writes results/benchmark_<budget>.{json,csv,md} and PNG plots."""
    _setup(threads)
    budgets, select_methods, run_benchmark = _from_bench("benchmark", "BUDGETS", "select_methods", "run_benchmark")
    if budget not in budgets:
        raise typer.BadParameter(f"unknown budget {budget!r}; choose from {', '.join(budgets)}", param_hint="--budget")
    try:
        select_methods(_split(methods))
    except KeyError as error:
        raise typer.BadParameter(error.args[0], param_hint="--methods") from None
    loaded = {}
    for item in checkpoint or []:
        name, _, path = item.partition("=")
        if not path:
            raise typer.BadParameter(f"expected METHOD=DIR, got {item!r}", param_hint="--checkpoint")
        loaded[name] = Path(path)
    result = run_benchmark(
        Path(data), output, budget, _split(methods), loaded, encoder, device, runs, seed, label,
        _split(suggest_methods) or (),
    )  # fmt: skip
    typer.echo((output / f"benchmark_{label or budget}.md").read_text())
    typer.echo(f"default: {result['default']}")


ServerOption = Annotated[str, typer.Option(envvar="METASENT_SERVER", help="Server base URL (METASENT_SERVER)")]
ApiKeyOption = Annotated[
    str | None, typer.Option(envvar="METASENT_API_KEY", help="API key, sent as a Bearer token (METASENT_API_KEY)")
]
AttemptsOption = Annotated[
    int,
    typer.Option(
        min=1,
        envvar="METASENT_ATTEMPTS",
        help="Requests in all when the server answers 429 or 503; waits as its Retry-After says (METASENT_ATTEMPTS)",
    ),
]


def _call(fn, *args):
    """Run a client call; a server error is printed (code, message, fix) and exits 1."""
    from metasent.app.client import MetasentError

    try:
        return fn(*args)
    except MetasentError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error


@cli.command()
def adapt(
    name: Annotated[str, typer.Option(help="A name for the domain")],
    examples: Annotated[Path, typer.Option(help="Support set: JSONL ({text, label} a line) or CSV (text,label)")],
    server: ServerOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the adaptation")] = 300.0,
    attempts: AttemptsOption = 4,
) -> None:
    """Adapt a new domain on a running server from a labelled support set; prints the domain as
    JSON (its domain_id is what `metasent classify --domain` takes)."""
    from metasent.app.client import MetasentClient, read_examples

    try:
        support = read_examples(examples)
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--examples") from error
    with MetasentClient(server, api_key, timeout, max_attempts=attempts) as client:
        domain = _call(client.create_domain, name, support)
    typer.echo(json.dumps(domain, indent=2))


class TableFormat(str, enum.Enum):
    """File formats of bulk classification (``metasent classify --output``)."""

    csv = "csv"
    jsonl = "jsonl"
    parquet = "parquet"


@cli.command()
def classify(
    domain: Annotated[str, typer.Option(help="domain_id returned by `metasent adapt`")],
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify")] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            help="More texts: one a line, or JSONL with a text field; with --output, a CSV, JSONL or Parquet table"
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Bulk: write --file's rows with their predictions to this CSV, JSONL or Parquet file, in batches, "
            "with a progress bar; rerun the same command to resume an interrupted run (README: Bulk classification)"
        ),
    ] = None,
    text_column: Annotated[str, typer.Option(help="Bulk: the --file column holding the texts")] = "text",
    batch_size: Annotated[
        int, typer.Option(min=1, help="Bulk: texts per request, at most the server's METASENT_MAX_TEXTS (512)")
    ] = 64,
    input_format: Annotated[
        TableFormat | None, typer.Option(help="Bulk: --file's format (default: from its extension)")
    ] = None,
    output_format: Annotated[
        TableFormat | None, typer.Option(help="Bulk: --output's format (default: from its extension)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Bulk: replace an existing --output and its journal, start over")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Bulk: show a progress bar on stderr")] = True,
    server: ServerOption = "http://127.0.0.1:8000",
    api_key: ApiKeyOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait")] = 120.0,
    attempts: AttemptsOption = 4,
) -> None:
    """Classify texts with an adapted domain on a running server; prints the predictions as JSON.
    With --output, classifies every row of a CSV, JSONL or Parquet --file in batches into a
    predictions file (resumable) and prints a summary as JSON."""
    from metasent.app.client import MetasentClient, read_texts

    if output is not None:
        _classify_file(
            domain, texts, file, output, text_column, batch_size, input_format, output_format, overwrite, progress,
            MetasentClient(server, api_key, timeout, max_attempts=attempts),
        )  # fmt: skip
        return
    all_texts = list(texts or [])
    if file is not None:
        try:
            all_texts += read_texts(file)
        except (OSError, UnicodeDecodeError) as error:
            raise typer.BadParameter(str(error), param_hint="--file") from error
    if not all_texts:
        raise typer.BadParameter("give texts as arguments or --file", param_hint="TEXTS")
    with MetasentClient(server, api_key, timeout, max_attempts=attempts) as client:
        result = _call(client.classify, domain, all_texts)
    typer.echo(json.dumps(result, indent=2))


def _classify_file(
    domain: str,
    texts: list[str] | None,
    file: Path | None,
    output: Path,
    text_column: str,
    batch_size: int,
    input_format: TableFormat | None,
    output_format: TableFormat | None,
    overwrite: bool,
    progress: bool,
    client: Any,
) -> None:
    """``metasent classify --output``: :func:`metasent.app.bulk.classify_file`; its errors exit 2
    (options) or 1 (the server's answer, with how to resume), an interruption 130."""
    from metasent.app.bulk import BulkError, BulkJob, classify_file
    from metasent.app.client import MetasentError

    if texts:
        raise typer.BadParameter("with --output, put the texts in the --file table", param_hint="TEXTS")
    if file is None:
        raise typer.BadParameter("--output needs a CSV, JSONL or Parquet --file to classify", param_hint="--file")
    job = BulkJob(
        domain,
        file,
        output,
        text_column,
        input_format=input_format.value if input_format is not None else None,
        output_format=output_format.value if output_format is not None else None,
        batch_size=batch_size,
        overwrite=overwrite,
        progress=progress,
    )
    resume = f"rerun the same command to resume from {job.journal}"
    with client:
        try:
            summary = classify_file(client, job)
        except BulkError as error:
            raise typer.BadParameter(str(error), param_hint=error.option) from None
        except MetasentError as error:
            hint = " (lower --batch-size)" if error.status == 413 else ""
            typer.echo(f"error: {error}{hint}", err=True)
            if job.journal.exists():
                typer.echo(resume, err=True)
            raise typer.Exit(1) from error
        except KeyboardInterrupt:
            typer.echo(f"interrupted: {resume}", err=True)
            raise typer.Exit(130) from None
    typer.echo(json.dumps(summary.as_dict(), indent=2))


db = typer.Typer(help="The domain store's database: schema migrations (Alembic).", no_args_is_help=True)
cli.add_typer(db, name="db")


@db.command("upgrade")
def db_upgrade(
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL (default: METASENT_DATABASE_URL, else the SQLite file in METASENT_DATA_DIR)"),
    ] = None,
    revision: Annotated[str, typer.Option(help="Target revision")] = "head",
) -> None:
    """Bring the database to the newest schema revision (or --revision). A database created before
    migrations existed is recognised as revision 0001 and upgraded; stored domains are kept. Safe
    to run while replicas serve and from several hosts at once (one migrator at a time)."""
    _setup(None)
    from metasent.app import migrations
    from metasent.app.settings import Settings
    from metasent.app.store import make_engine

    url = database_url or Settings().database()
    engine = make_engine(url)
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        before, after = migrations.upgrade(engine, revision)
    finally:
        engine.dispose()
    typer.echo(f"{engine.url.render_as_string(hide_password=True)}: schema revision {before} -> {after}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
