"""First-order MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning", section 5.2 first-order
approximation) over a head built from the support set: the matching-network head (Vinyals et al.
2016) of the shipped model, or a Proto-MAML head (Triantafillou et al. 2020). With no inner step
the same query loss is the prototypical-network loss (Snell et al. 2017), or with the matching
classifier the matching-network loss, so :mod:`meta.algorithms.protonet` and
:mod:`meta.algorithms.matching` reuse this module's outer step (:func:`query_loss_outer_loop`).

For each episode the inner loop (:func:`meta.inner.take_inner_steps`, the steps the server's
:func:`meta.inner.inner_loop` takes) adapts the top encoder layers (their LoRA adapters) and, for
Proto-MAML, the head on the support set. The query loss is then evaluated at

    phi = theta + stopgrad(phi_adapted - theta)

so that its gradient with respect to ``theta`` is the query-loss gradient taken at the adapted
parameters (the first-order MAML update, :func:`meta.inner.straight_through`), while the
parameters the inner loop does not adapt and the head's initialisation from the support set
(:func:`meta.inner.init_head`) receive their ordinary gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metasent.data.episodes import Episode

from ..config import InnerLoopConfig
from ..distributed import average_gradients
from ..feature_cache import LowerLayerCache
from ..heads import HEAD_PREFIX
from ..inner import (
    anchor_texts,
    autocast,
    detached_parameters,
    encode_labels,
    evaluating,
    init_head,
    straight_through,
    support_embedder,
    support_with_anchors,
    take_inner_steps,
)
from ..model import FrozenFeatures, MetaLearner, Params
from .common import clamp_meta_parameters
from .registry import AlgorithmSpec, OuterLoop, OuterLoopContext, register


def fomaml_query_loss(
    model: MetaLearner,
    episode: Episode,
    inner_config: InnerLoopConfig,
    cache_frozen: bool = True,
    feature_cache: LowerLayerCache | None = None,
) -> tuple[Tensor, Tensor]:
    """The first-order MAML query loss of one episode.

    ``loss.backward()`` leaves in each meta-parameter's ``.grad`` the query-loss gradient taken
    at the adapted parameters (for adapted tensors) or at the meta-parameters (for the others).

    Args:
        model (`MetaLearner`): the meta-learner; its parameters are the meta-parameters.
        episode (`Episode`): support and query sets.
        inner_config (`InnerLoopConfig`): the inner loop, as the server will run it.
        cache_frozen (`bool`, defaults to True): passed to :func:`meta.inner.support_embedder`.
        feature_cache (`LowerLayerCache`, *optional*): outputs of the frozen bottom layers per
            text (only when meta-training leaves those layers unchanged).

    Returns:
        `(Tensor, Tensor)`: the scalar query cross-entropy (nats) and the query accuracy (a
        scalar tensor in [0, 1], on the model's device: reading neither waits for the device).
    """
    texts = _support_texts(episode, inner_config)
    query_texts = [ex.text for ex in episode.query]
    meta_params = dict(model.named_parameters())
    with autocast(model.device):  # bf16 on CUDA, no-op on CPU
        lower: FrozenFeatures | None = None
        if feature_cache is not None:
            lower = feature_cache.features(texts)  # layer input, (N*K [+ N], tokens, hidden)
        elif 0 < inner_config.adapted_layers < model.num_layers and cache_frozen:
            # the layers below the adapted ones run once, with their graph; the inner loop starts
            # from their (detached) output instead of running them again
            lower = model.layer_input(model.tokenize(texts), model.num_layers - inner_config.adapted_layers, grad=True)
        if lower is not None:
            support_z = model.embed_frozen(meta_params, lower)  # (N*K [+ N], hidden)
            mask = lower.attention_mask
            frozen = lower

            def embed_support(encoder: Params) -> Tensor:  # (N*K [+ N], hidden), graph into theta
                return model.embed_frozen(encoder, frozen)

        else:
            batch = model.tokenize(texts)
            support_z = model(**batch)  # (N*K [+ N], hidden)
            mask = batch["attention_mask"]

            def embed_support(encoder: Params) -> Tensor:  # (N*K [+ N], hidden), graph into theta
                return model.embed(encoder, batch)

        # A head-only inner loop reuses these embeddings instead of running the encoder again.
        support_features = (
            FrozenFeatures(mask, model.num_layers, embeddings=support_z.detach())
            if inner_config.adapted_layers == 0 and cache_frozen
            else lower.detach()
            if lower is not None
            else None
        )

        def embed_query(encoder: Params) -> Tensor:  # (N*Q, hidden)
            if feature_cache is not None:
                return model.embed_frozen(encoder, feature_cache.features(query_texts))
            return model.embed(encoder, model.tokenize(query_texts))

        return _episode_loss(
            model,
            meta_params,
            episode,
            inner_config,
            support_z,
            support_features,
            (embed_support, embed_query),
            cache_frozen,
        )


def fomaml_meta_batch_loss(
    model: MetaLearner, episodes: Sequence[Episode], inner_config: InnerLoopConfig
) -> tuple[Tensor, Tensor]:
    """:func:`fomaml_query_loss` averaged over a meta-batch, with one encoder pass of the layers
    below the adapted ones for every support, anchor and query text of every episode: those
    layers' meta-parameters are the same in all episodes, so only the top
    ``inner_config.adapted_layers`` run per episode (on the support set at the meta-parameters, in
    the inner loop, and on the query set at the adapted parameters).

    Args:
        model (`MetaLearner`): the meta-learner.
        episodes (`Sequence[Episode]`): the meta-batch.
        inner_config (`InnerLoopConfig`): with ``0 < adapted_layers < num_layers``.

    Returns:
        `(Tensor, Tensor)`: the mean query cross-entropy (nats) and the mean query accuracy,
        scalar tensors on the model's device.

    Raises:
        ValueError: when ``adapted_layers`` is 0, -1 or every layer (use
            :func:`fomaml_query_loss` per episode).
    """
    first = model.num_layers - inner_config.adapted_layers
    if inner_config.adapted_layers < 1 or first < 1:
        raise ValueError("the meta-batch pass needs 0 < adapted_layers < the encoder's layers")
    spans: list[tuple[slice, slice]] = []
    texts: list[str] = []
    for episode in episodes:
        support_texts, query_texts = _support_texts(episode, inner_config), [ex.text for ex in episode.query]
        middle = len(texts) + len(support_texts)
        spans.append((slice(len(texts), middle), slice(middle, middle + len(query_texts))))
        texts += support_texts + query_texts
    meta_params = dict(model.named_parameters())
    losses, accuracies = [], []
    with autocast(model.device):  # bf16 on CUDA, no-op on CPU
        token_ids = model.encode(texts)
        lower = model.layer_input(model.collate(token_ids), first, grad=True)  # (texts, tokens, hidden): one pass
        for episode, (support_rows, query_rows) in zip(episodes, spans, strict=True):
            # each sub-batch is cut to its own longest text: the top layers run on no extra padding
            support = lower.rows(support_rows, max(map(len, token_ids[support_rows])))
            support_z = model.embed_frozen(meta_params, support)  # (N*K [+ N], hidden), graph into theta
            query = lower.rows(query_rows, max(map(len, token_ids[query_rows])))

            def embed_support(encoder: Params, support: FrozenFeatures = support) -> Tensor:  # (N*K [+ N], hidden)
                return model.embed_frozen(encoder, support)

            def embed_query(encoder: Params, query: FrozenFeatures = query) -> Tensor:  # (N*Q, hidden)
                return model.embed_frozen(encoder, query)

            loss, accuracy = _episode_loss(
                model, meta_params, episode, inner_config, support_z, support.detach(), (embed_support, embed_query)
            )
            losses.append(loss)
            accuracies.append(accuracy)
    return torch.stack(losses).mean(), torch.stack(accuracies).mean()


def _support_texts(episode: Episode, inner_config: InnerLoopConfig) -> list[str]:
    """The support texts, then the label-name anchors when the inner loop uses them."""
    anchors = anchor_texts(episode.labels) if inner_config.label_anchors else []
    return [ex.text for ex in episode.support] + anchors


def _episode_loss(
    model: MetaLearner,
    meta_params: Mapping[str, Tensor],
    episode: Episode,
    inner_config: InnerLoopConfig,
    support_z: Tensor,
    support_features: FrozenFeatures | None,
    embedders: tuple[Callable[[Params], Tensor], Callable[[Params], Tensor]],
    cache_frozen: bool = True,
) -> tuple[Tensor, Tensor]:
    """The FOMAML query loss and accuracy of one episode from its support embeddings
    ``support_z`` (N*K [+ N], hidden; with their graph into the meta-parameters), the support
    features the inner loop starts from, and ``embedders``: ``embed_support(encoder) -> (N*K [+
    N], hidden)`` and ``embed_query(encoder) -> (N*Q, hidden)`` at the given encoder tensors (with
    their graph); ``meta_params`` are the model's parameters by name. A head made of the support
    set (matching, :attr:`meta.heads.Head.derived`) is rebuilt from the support set embedded
    at the adapted encoder, so the query loss reaches the encoder through both sets."""
    embed_support, embed_query = embedders
    support_labels = [ex.label for ex in episode.support]
    support_y = encode_labels(support_labels, episode.labels, model.device)  # (N*K,)
    head = init_head(model, support_z, support_y, len(episode.labels), inner_config)  # graph into theta
    # the inner loop from that head's values on the support set (already embedded up to the
    # adapted layers when ``support_features``); the query loss below rebuilds a derived head
    # itself, with its graph, so the inner loop neither rebuilds nor scores it
    base = detached_parameters(model)
    texts = support_with_anchors([ex.text for ex in episode.support], episode.labels, inner_config)
    with evaluating(model):
        embed = support_embedder(model, base, texts, inner_config.adapted_layers, cache_frozen, support_features)
        adapted_encoder, adapted_head, _ = take_inner_steps(model, base, embed, support_y, inner_config, head)
    adapted = {} if type(head).derived else adapted_head  # a derived head takes no step
    names = [*adapted_encoder, *(HEAD_PREFIX + name for name in adapted)]
    rates = model.inner_lrs(names)  # Meta-SGD, or None
    lrs: dict[str, Tensor | None] = dict(zip(names, rates, strict=True)) if rates else dict.fromkeys(names)
    encoder = {name: straight_through(meta_params[name], phi, lrs[name]) for name, phi in adapted_encoder.items()}
    if type(head).derived:  # the support set at the adapted encoder (no step changed it when none is adapted)
        query_head = (
            init_head(model, embed_support(encoder), support_y, len(episode.labels), inner_config) if encoder else head
        )
    else:
        query_head = head.with_tensors(
            {name: straight_through(t, adapted[name], lrs[HEAD_PREFIX + name]) for name, t in head.tensors().items()}
        )
    query_y = encode_labels([ex.label for ex in episode.query], episode.labels, model.device)  # (N*Q,)
    logits = query_head.logits(embed_query(encoder), model.logit_scale)  # (N*Q, N)
    loss = F.cross_entropy(logits, query_y)
    accuracy = (logits.argmax(-1) == query_y).float().mean()
    return loss, accuracy


def fomaml_step(
    model: MetaLearner,
    episodes: Sequence[Episode],
    inner_config: InnerLoopConfig,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = None,
    cache_frozen: bool = True,
    feature_cache: LowerLayerCache | None = None,
    batched: bool | None = None,
) -> tuple[float, float]:
    """One outer-loop update from a meta-batch of episodes (mean query loss), with gradient
    clipping; returns the mean query loss (nats) and accuracy before the update.

    With ``batched`` (and ``0 < adapted_layers <`` the encoder's layers, no feature cache) the
    layers below the adapted ones run once for the whole meta-batch
    (:func:`fomaml_meta_batch_loss`); otherwise each episode runs on its own
    (:func:`fomaml_query_loss`). ``None`` batches on CUDA only: on a CPU the one pass, padded to
    the meta-batch's longest text, measured 15% slower than per-episode passes (``metasent
    speed``), while a GPU needs the larger batches to be busy. The figures stay on the device
    until the update is queued: the step reads them back once (no host sync per episode or inner
    step). In a distributed run (:mod:`meta.distributed`) the gradient is averaged over every
    rank's episodes before clipping; the figures returned are this rank's."""
    optimizer.zero_grad(set_to_none=True)
    losses, accuracies = [], []
    batched = model.device.type == "cuda" if batched is None else batched
    if batched and feature_cache is None and 0 < inner_config.adapted_layers < model.num_layers:
        loss, accuracy = fomaml_meta_batch_loss(model, episodes, inner_config)
        loss.backward()
        losses.append(loss.detach().float())
        accuracies.append(accuracy)
    else:
        for episode in episodes:
            loss, accuracy = fomaml_query_loss(model, episode, inner_config, cache_frozen, feature_cache)
            (loss / len(episodes)).backward()
            losses.append(loss.detach().float())
            accuracies.append(accuracy)
    average_gradients(model.parameters(), len(episodes))  # over every rank's episodes (no-op in one process)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    clamp_meta_parameters(model)
    mean_loss, mean_accuracy = torch.stack([torch.stack(losses).mean(), torch.stack(accuracies).mean()]).tolist()
    return mean_loss, mean_accuracy


def query_loss_outer_loop(context: OuterLoopContext) -> OuterLoop:
    """The first-order MAML outer step (:func:`fomaml_step`) with the context's inner
    loop: FOMAML with inner steps, the prototypical- or matching-network loss with none.

    Args:
        context (`OuterLoopContext`): model, config, optimizer and feature cache.

    Returns:
        `OuterLoop`: the step; it returns the mean query loss (nats) and query accuracy.
    """
    return OuterLoop(
        lambda episodes: fomaml_step(
            context.model,
            episodes,
            context.config.inner_loop,
            context.optimizer,
            context.grad_clip,
            feature_cache=context.feature_cache,
        )
    )


def lora_meta_sgd_inner_loop() -> InnerLoopConfig:
    """FOMAML's inner loop: 3 SGD steps on the rank-8 LoRA adapters of the top 2 layers (adapters
    on every layer's attention and feed-forward projections are meta-trained), each tensor with its
    own meta-learned learning rate starting at 0.05 (Meta-SGD, Li et al. 2017), on the
    leave-one-out loss of the matching-network head with label anchors; the head is then the
    support set embedded by the adapted encoder. Chosen on the dev tasks over the Proto-MAML head
    (README, "The shipped model")."""
    return InnerLoopConfig(
        steps=3, lr=0.05, adapted_layers=2, classifier="matching", adapter="lora", lora_rank=8, meta_sgd=True
    )


SPEC = register(
    AlgorithmSpec(
        name="fomaml",
        description="first-order MAML (Finn et al. 2017) with Meta-SGD step sizes (Li et al. 2017) over LoRA "
        "adapters (Hu et al. 2021) and a matching-network head (Vinyals et al. 2016): the query-loss gradient at "
        "the support-adapted parameters; 3 inner steps on the top 2 layers' LoRA, base encoder frozen",
        default_inner_loop=lora_meta_sgd_inner_loop,
        make_outer_loop=query_loss_outer_loop,
        distributed=True,
        # LoRA tensors start at B = 0 and need a larger outer step than a pretrained encoder
        training_defaults={"label_anchors": True, "query_sampling": "natural", "outer_lr": 1e-3},
    )
)
