"""Where the algorithm's defaults meet the user's choices: the one resolver of the inner loop a
run trains, evaluates or serves with, and of a meta-training run's configuration.

:mod:`meta.config` is plain data; each algorithm's defaults live with its spec
(:class:`meta.algorithms.AlgorithmSpec`: ``default_inner_loop`` and ``training_defaults``). This
module, above both, applies them:

- :func:`resolve_inner_loop`: an algorithm's default inner loop, or a checkpoint's, with
  overrides (``metasent train``, ``metasent evaluate``, ``metasent export`` and the benchmark);
- :func:`checkpoint_config`: a :class:`~meta.config.TrainingArguments` to the
  :class:`~meta.config.CheckpointConfig` of a new run.

Errors name the argument they come from (:class:`ArgumentError`), so that the command line can
point at its option.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .algorithms import AlgorithmSpec, get
from .config import (
    CheckpointConfig,
    EncoderConfig,
    InnerLoopConfig,
    TrainConfig,
    TrainingArguments,
    override_inner_loop,
)

INNER_LOOP_ARGUMENTS = {
    "inner_steps": "steps",
    "inner_lr": "lr",
    "adapted_layers": "adapted_layers",
    "classifier": "classifier",
    "label_anchors": "label_anchors",
    "adapter": "adapter",
    "lora_rank": "lora_rank",
    "lora_layers": "lora_layers",
    "meta_sgd": "meta_sgd",
}
""":class:`~meta.config.TrainingArguments` fields that set an :class:`~meta.config.InnerLoopConfig`
field, by argument name (the steps first: an invalid combination is reported on the first one given)."""


class ArgumentError(ValueError):
    """A run's argument is invalid (a ``ValueError``).

    Args:
        argument (`str`): the :class:`~meta.config.TrainingArguments` field (or command option, by
            its field-style name, e.g. ``"init_from"``) at fault.
        message (`str`): what is wrong.
    """

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def messages(error: ValidationError) -> str:
    """A pydantic error's messages, joined, without pydantic's ``"Value error, "`` prefix."""
    return "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())


def resolve_inner_loop(base: str | InnerLoopConfig, **overrides: Any) -> InnerLoopConfig:
    """The inner loop to train, evaluate or serve with: ``base`` with ``overrides``.

    Args:
        base (`str | InnerLoopConfig`): an algorithm's name, for its spec's default inner loop
            with the inner-loop fields of its ``training_defaults`` (e.g. FOMAML's and matching's
            label anchors); or an inner loop as it is (a checkpoint's).
        **overrides: :class:`~meta.config.InnerLoopConfig` fields (``steps=``, ``lr=``,
            ``classifier=`` ...); ``None`` keeps the base's value.

    Returns:
        `InnerLoopConfig`: a new object, validated once with every override applied.

    Raises:
        UnknownAlgorithmError: (a ``ValueError``) for an unregistered algorithm name.
        ArgumentError: naming the overridden field at fault (the field of a field error, else the
            first override given), for an invalid combination such as inner steps with the
            matching head on no encoder layer.
        TypeError: for a name that is not an inner-loop field.
    """
    given = [name for name, value in overrides.items() if value is not None]
    if isinstance(base, str):
        spec = get(base)
        defaults = {k: v for k, v in spec.training_defaults.items() if k in InnerLoopConfig.model_fields}
        overrides = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
        base = spec.default_inner_loop()
    try:
        return override_inner_loop(base, **overrides)
    except ValidationError as error:
        fields = [str(e["loc"][0]) for e in error.errors() if e["loc"]]
        raise ArgumentError(next(iter(fields + given), "steps"), messages(error)) from error


def training_value(args: TrainingArguments, name: str) -> Any:
    """Field ``name`` of ``args`` as the run uses it: the user's value when set, else the
    algorithm's training default when its spec has one, else the field's default.

    Raises:
        UnknownAlgorithmError: for an unregistered ``args.algorithm``.
    """
    defaults = get(args.algorithm).training_defaults
    if name not in args.model_fields_set and name in defaults:
        return defaults[name]
    return getattr(args, name)


def run_inner_loop(args: TrainingArguments) -> InnerLoopConfig:
    """The inner loop of a new run: :func:`resolve_inner_loop` of ``args.algorithm`` with the
    inner-loop arguments that are set (:data:`INNER_LOOP_ARGUMENTS`; ``label_anchors`` as
    :func:`training_value` gives it).

    Raises:
        UnknownAlgorithmError: for an unregistered algorithm.
        ArgumentError: naming the argument (e.g. ``inner_steps``) of an invalid combination.
    """
    chosen = {field: getattr(args, arg) for arg, field in INNER_LOOP_ARGUMENTS.items() if arg != "label_anchors"}
    chosen["label_anchors"] = training_value(args, "label_anchors")  # always applied; last, so errors name the others
    try:
        return resolve_inner_loop(args.algorithm, **chosen)
    except ArgumentError as error:
        arguments = {field: argument for argument, field in INNER_LOOP_ARGUMENTS.items()}
        raise ArgumentError(arguments.get(error.argument, error.argument), str(error)) from error


def train_config(args: TrainingArguments) -> TrainConfig:
    """The :class:`~meta.config.TrainConfig` part of ``args``, with the algorithm's training
    defaults applied (:func:`training_value`)."""
    return TrainConfig.model_validate({name: training_value(args, name) for name in TrainConfig.model_fields})


def checkpoint_config(args: TrainingArguments, inner_loop: InnerLoopConfig | None = None) -> CheckpointConfig:
    """The config of a new run (step 0); ``training`` is ``None`` for an algorithm that is not
    meta-trained.

    Args:
        args (`TrainingArguments`): the run's arguments.
        inner_loop (`InnerLoopConfig`, *optional*): already resolved (default:
            :func:`run_inner_loop`).

    Raises:
        ArgumentError: for an unregistered algorithm (argument ``algorithm``, the message naming
            the registered ones) or an invalid inner loop (naming its argument).
    """
    spec = check_algorithm(args.algorithm)
    return CheckpointConfig(
        algorithm=args.algorithm,
        encoder=EncoderConfig(name_or_path=args.encoder, max_length=args.max_length),
        inner_loop=run_inner_loop(args) if inner_loop is None else inner_loop,
        training=train_config(args) if spec.meta_trained else None,
    )


def check_algorithm(name: str) -> AlgorithmSpec:
    """The registered spec of ``name``.

    Raises:
        ArgumentError: (argument ``algorithm``) naming the registered algorithms.
    """
    try:
        return get(name)
    except ValueError as error:
        raise ArgumentError("algorithm", str(error)) from error
