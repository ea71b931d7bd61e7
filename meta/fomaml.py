"""First-order MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning", section 5.2 first-order
approximation) with a Proto-MAML head (Triantafillou et al. 2020): the query loss and the outer
step. With no inner step the same query loss is the prototypical-network loss (Snell et al. 2017),
and with the matching classifier the matching-network loss (Vinyals et al. 2016).

For each episode the inner loop (:func:`meta.adaptation.inner_loop`) adapts the head and the top
encoder layers on the support set. The query loss is then evaluated at

    phi = theta + stopgrad(phi_adapted - theta)

so that its gradient with respect to ``theta`` is the query-loss gradient taken at the adapted
parameters (the first-order MAML update, :func:`meta.adaptation.straight_through`), while the
parameters the inner loop does not adapt and the head's initialisation from the support set
(:func:`meta.adaptation.init_head`) receive their ordinary gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metasent.data.episodes import Episode

from .adaptation import anchor_texts, autocast, encode_labels, init_head, inner_loop, straight_through
from .config import InnerLoopConfig
from .feature_cache import LowerLayerCache
from .model import FrozenFeatures, MetaLearner

MIN_LOGIT_SCALE, MAX_LOGIT_SCALE = math.log(1.0), math.log(100.0)
MAX_LABEL_LOG_WEIGHT = math.log(20.0)


@torch.no_grad()
def clamp_meta_parameters(model: MetaLearner) -> None:
    """Keep the logit temperature in [1, 100] and a label anchor's weight in [1/20, 20] (in
    place), so that one bad outer step cannot make the softmax saturate."""
    model.logit_scale.clamp_(MIN_LOGIT_SCALE, MAX_LOGIT_SCALE)
    model.label_log_weight.clamp_(-MAX_LABEL_LOG_WEIGHT, MAX_LABEL_LOG_WEIGHT)


def fomaml_query_loss(
    model: MetaLearner,
    episode: Episode,
    inner_config: InnerLoopConfig,
    cache_frozen: bool = True,
    feature_cache: LowerLayerCache | None = None,
) -> tuple[Tensor, float]:
    """The first-order MAML query loss of one episode.

    ``loss.backward()`` leaves in each meta-parameter's ``.grad`` the query-loss gradient taken
    at the adapted parameters (for adapted tensors) or at the meta-parameters (for the others).

    Args:
        model (`MetaLearner`): the meta-learner; its parameters are the meta-parameters.
        episode (`Episode`): support and query sets.
        inner_config (`InnerLoopConfig`): the inner loop, as the server will run it.
        cache_frozen (`bool`, defaults to True): passed to :func:`meta.adaptation.inner_loop`.
        feature_cache (`LowerLayerCache`, *optional*): outputs of the frozen bottom layers per
            text (only when meta-training leaves those layers unchanged).

    Returns:
        `(Tensor, float)`: the scalar query cross-entropy (nats) and the query accuracy.
    """
    support_texts = [ex.text for ex in episode.support]
    support_labels = [ex.label for ex in episode.support]
    # label-name anchors (when used) run through the encoder with the support texts
    texts = support_texts + (anchor_texts(episode.labels) if inner_config.label_anchors else [])
    query_texts = [ex.text for ex in episode.query]
    meta_params = dict(model.named_parameters())
    with autocast(model.device):  # bf16 on CUDA, no-op on CPU
        support_y = encode_labels(support_labels, episode.labels, model.device)
        lower: FrozenFeatures | None = None
        if feature_cache is not None:
            lower = feature_cache.features(texts)  # layer input, (N*K [+ N], tokens, hidden)
            support_z = model.embed_frozen(meta_params, lower)  # (N*K [+ N], hidden)
            mask = lower.attention_mask
        else:
            batch = model.tokenize(texts)
            support_z = model(**batch)  # (N*K [+ N], hidden)
            mask = batch["attention_mask"]
        # A head-only inner loop reuses these embeddings instead of running the encoder again.
        support_features = (
            FrozenFeatures(mask, model.num_layers, embeddings=support_z.detach())
            if inner_config.adapted_layers == 0 and cache_frozen
            else lower
        )
        head = init_head(model, support_z, support_y, len(episode.labels), inner_config)  # graph into theta
        state = inner_loop(
            model,
            support_texts,
            support_labels,
            inner_config,
            label_names=episode.labels,
            initial_head=head,  # only its values: the inner loop detaches it
            cache_frozen=cache_frozen,
            support_features=support_features,
        )
        adapted = state.head.tensors()
        query_head = head.with_tensors({name: straight_through(t, adapted[name]) for name, t in head.tensors().items()})
        encoder = {name: straight_through(meta_params[name], phi) for name, phi in state.encoder.items()}
        query_y = encode_labels([ex.label for ex in episode.query], episode.labels, model.device)
        if feature_cache is not None:
            query_z = model.embed_frozen(encoder, feature_cache.features(query_texts))
        else:
            query_z = model.embed(encoder, model.tokenize(query_texts))  # (N*Q, hidden)
        logits = query_head.logits(query_z, model.logit_scale)  # (N*Q, N)
        loss = F.cross_entropy(logits, query_y)
        accuracy = float((logits.argmax(-1) == query_y).float().mean())
    return loss, accuracy


def fomaml_step(
    model: MetaLearner,
    episodes: Sequence[Episode],
    inner_config: InnerLoopConfig,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = None,
    cache_frozen: bool = True,
    feature_cache: LowerLayerCache | None = None,
) -> tuple[float, float]:
    """One outer-loop update from a meta-batch of episodes (mean query loss), with gradient
    clipping; returns the mean query loss (nats) and accuracy before the update."""
    optimizer.zero_grad(set_to_none=True)
    losses, accuracies = [], []
    for episode in episodes:
        loss, accuracy = fomaml_query_loss(model, episode, inner_config, cache_frozen, feature_cache)
        (loss / len(episodes)).backward()
        losses.append(loss.item())
        accuracies.append(accuracy)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    clamp_meta_parameters(model)
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)
