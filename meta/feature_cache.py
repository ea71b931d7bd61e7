"""A cache of what the frozen bottom layers of the encoder compute for each training text.

When meta-training leaves the embeddings and the bottom ``first_layer`` encoder layers
unchanged (``TrainConfig.frozen_layers``), their output for a text never changes, so it is
computed once and reused by every later episode that draws the text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .model import FrozenFeatures, MetaLearner


class LowerLayerCache:
    """Per-text input of encoder layer ``first_layer`` (the real tokens only), kept on the CPU.

    Args:
        model (`MetaLearner`): the model; its layers below ``first_layer`` must stay frozen.
        first_layer (`int`): the first layer that is not cached, in ``[1, num_layers)``.
        dtype (`torch.dtype`, defaults to float16): storage type (float32 for exact reuse).
        max_texts (`int`, defaults to 200000): texts kept; the oldest are dropped beyond it.
        batch_size (`int`, defaults to 32): texts per forward pass when filling the cache.

    Raises:
        ValueError: when ``first_layer`` is outside ``[1, num_layers)``.
    """

    def __init__(
        self,
        model: MetaLearner,
        first_layer: int,
        dtype: torch.dtype = torch.float16,
        max_texts: int = 200_000,
        batch_size: int = 32,
    ) -> None:
        if not 1 <= first_layer < model.num_layers:
            raise ValueError(f"first_layer must be in [1, {model.num_layers}), got {first_layer}")
        self.model, self.first_layer, self.dtype = model, first_layer, dtype
        self.max_texts, self.batch_size = max_texts, batch_size
        self._store: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def _fill(self, texts: list[str]) -> None:
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            features = self.model.layer_input(self.model.tokenize(chunk), self.first_layer)
            assert features.hidden is not None
            mask = features.attention_mask.bool()  # (chunk, tokens)
            for row, text in enumerate(chunk):
                self._store[text] = features.hidden[row][mask[row]].to(self.dtype).cpu()  # (tokens_i, hidden)
        while len(self._store) > self.max_texts:
            self._store.pop(next(iter(self._store)))

    def features(self, texts: Sequence[str]) -> FrozenFeatures:
        """The input of layer ``first_layer`` for ``texts`` as one padded batch.

        Only the embeddings run for the batch (to get the attention arguments in the encoder's
        own format); the lower layers run only for texts not seen before.

        Returns:
            `FrozenFeatures`: hidden (batch, tokens, hidden) on the model's device.
        """
        missing = [t for t in dict.fromkeys(texts) if t not in self._store]
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        if missing:
            self._fill(missing)
        batch = self.model.tokenize(texts)
        template = self.model.layer_input(batch, 0)  # embeddings only: the layer arguments
        mask = batch["attention_mask"].bool()  # (batch, tokens)
        hidden = torch.zeros(*mask.shape, int(self.model.encoder.config.hidden_size), device=self.model.device)
        for row, text in enumerate(texts):
            hidden[row][mask[row]] = self._store[text].to(device=hidden.device, dtype=hidden.dtype)
        return FrozenFeatures(
            batch["attention_mask"], self.first_layer, hidden, template.layer_args, template.layer_kwargs
        )
