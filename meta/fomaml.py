"""First-order MAML meta-training (Finn et al. 2017, "Model-Agnostic Meta-Learning", section
5.2 first-order approximation) with a Proto-MAML head (Triantafillou et al. 2020).

For each episode the inner loop (:func:`meta.inner_loop.inner_loop`) adapts the head and the top
encoder layers on the support set. The query loss is then evaluated at

    phi = theta + stopgrad(phi_adapted - theta)

so that its gradient with respect to ``theta`` is the query-loss gradient taken at the adapted
parameters (the first-order MAML update), while the parameters the inner loop does not adapt and
the prototype initialisation of the head receive their ordinary gradients.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from data.episodes import Episode, EpisodeSampler, NotEnoughExamplesError
from data.registry import Task
from meta.checkpoint import save_checkpoint
from meta.config import CheckpointConfig, InnerLoopConfig, TrainConfig
from meta.evaluate import evaluate_episode
from meta.feature_cache import LowerLayerCache
from meta.inner_loop import autocast, encode_labels, inner_loop
from meta.model import FrozenFeatures, MetaLearner, frozen_parameter_names, prototype_head

logger = logging.getLogger(__name__)

MIN_LOGIT_SCALE, MAX_LOGIT_SCALE = math.log(1.0), math.log(100.0)


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
        cache_frozen (`bool`, defaults to True): passed to :func:`meta.inner_loop.inner_loop`.
        feature_cache (`LowerLayerCache`, *optional*): outputs of the frozen bottom layers per
            text (only when meta-training leaves those layers unchanged).

    Returns:
        `(Tensor, float)`: the scalar query cross-entropy (nats) and the query accuracy.
    """
    support_texts = [ex.text for ex in episode.support]
    support_labels = [ex.label for ex in episode.support]
    query_texts = [ex.text for ex in episode.query]
    meta_params = dict(model.named_parameters())
    with autocast(model.device):  # bf16 on CUDA, no-op on CPU
        support_y = encode_labels(support_labels, episode.labels, model.device)
        lower: FrozenFeatures | None = None
        if feature_cache is not None:
            lower = feature_cache.features(support_texts)  # layer input, (N*K, tokens, hidden)
            support_z = model.embed_frozen(meta_params, lower)  # (N*K, hidden)
            mask = lower.attention_mask
        else:
            batch = model.tokenize(support_texts)
            support_z = model(**batch)  # (N*K, hidden)
            mask = batch["attention_mask"]
        # A head-only inner loop reuses these embeddings instead of running the encoder again.
        support_features = (
            FrozenFeatures(mask, model.num_layers, embeddings=support_z.detach())
            if inner_config.adapted_layers == 0 and cache_frozen
            else lower
        )
        head = prototype_head(support_z, support_y, len(episode.labels))  # graph into theta
        adaptation = inner_loop(
            model,
            support_texts,
            support_labels,
            inner_config,
            label_names=episode.labels,
            initial_head={k: v.detach() for k, v in head.items()},
            cache_frozen=cache_frozen,
            support_features=support_features,
        )
        params: dict[str, Tensor] = {}
        for name, adapted in adaptation.params.items():
            start = head[name] if name in head else meta_params[name]
            params[name] = start + (adapted - start.detach())  # value: adapted; gradient: identity
        query_y = encode_labels([ex.label for ex in episode.query], episode.labels, model.device)
        if feature_cache is not None:
            logits = model.head_logits(params, model.embed_frozen(params, feature_cache.features(query_texts)))
        else:
            logits = model.logits(params, model.tokenize(query_texts))  # (N*Q, N)
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
    with torch.no_grad():
        model.logit_scale.clamp_(MIN_LOGIT_SCALE, MAX_LOGIT_SCALE)
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


def usable_tasks(tasks: Sequence[Task], sampler: EpisodeSampler) -> list[Task]:
    """Tasks from which ``sampler`` can draw an episode (others are logged and skipped)."""
    usable = []
    for task in tasks:
        try:
            EpisodeSampler(
                [task],
                sampler.n_way,
                sampler.k_shot,
                sampler.q_query,
                sampler.support_split,
                sampler.query_split,
            ).sample()
            usable.append(task)
        except (NotEnoughExamplesError, KeyError) as error:
            logger.warning("skipping task %s: %s", task.name, error)
    return usable


def validation_episodes(tasks: Sequence[Task], config: TrainConfig) -> list[Episode]:
    """Fixed validation episodes: ``val_episodes`` per task from ``val_split``, K-shot support
    and ``val_q_query`` query examples per class, from seed ``config.seed + 1``."""
    sampler = EpisodeSampler(
        tasks,
        config.n_way,
        config.k_shot,
        q_query=config.val_q_query,
        support_split=config.val_split,
        seed=config.seed + 1,
    )
    return [sampler.sample(task) for task in usable_tasks(tasks, sampler) for _ in range(config.val_episodes)]


def validate(model: MetaLearner, episodes: Sequence[Episode], inner_config: InnerLoopConfig) -> float:
    """Mean query accuracy (percent) over ``episodes`` after the inner loop."""
    results = [evaluate_episode(model, episode, inner_config) for episode in episodes]
    return 100 * sum(r.accuracy for r in results) / max(len(results), 1)


def _lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        remaining = max(config.outer_steps - config.warmup_steps, 1)
        return max(0.1, 1.0 - 0.9 * (step - config.warmup_steps) / remaining)  # linear to 10%

    return factor


def meta_train(
    model: MetaLearner,
    train_tasks: Sequence[Task],
    val_tasks: Sequence[Task],
    config: CheckpointConfig,
    output_dir: str | Path,
    training_state: dict[str, Any] | None = None,
    progress: bool = True,
) -> CheckpointConfig:
    """Meta-train ``model`` with first-order MAML; write ``<output_dir>/last`` every
    ``save_every`` steps and at the end, and ``<output_dir>/best`` at each validation record.

    Args:
        model (`MetaLearner`): the meta-learner, trained in place.
        train_tasks (`Sequence[Task]`): meta-training tasks (their ``train`` split).
        val_tasks (`Sequence[Task]`): validation tasks (their ``config.training.val_split``).
        config (`CheckpointConfig`): with ``training`` set; ``step`` and ``metrics`` are updated.
        output_dir (`str | Path`): where checkpoints go.
        training_state (`dict`, *optional*): state from :func:`meta.checkpoint.load_training_state`
            to resume from.
        progress (`bool`, defaults to True): show a tqdm bar with running meta-loss and accuracy.

    Returns:
        `CheckpointConfig`: the final config (also saved in ``<output_dir>/last``).

    Raises:
        ValueError: when no training task can supply an episode.
    """
    train = config.training
    if train is None:
        raise ValueError("config.training must be set for meta-training")
    output_dir = Path(output_dir)
    torch.manual_seed(train.seed)
    sampler = EpisodeSampler(train_tasks, train.n_way, train.k_shot, train.q_query, seed=train.seed)
    sampler.tasks = usable_tasks(train_tasks, sampler)
    if not sampler.tasks:
        raise ValueError("no meta-training task has enough examples for an episode")
    val_set = validation_episodes(val_tasks, train) if val_tasks else []
    logger.info("meta-training on %d tasks, validating on %d episodes", len(sampler.tasks), len(val_set))
    model.eval()  # dropout off in both loops, as in the server's adaptation
    feature_cache = None
    if train.frozen_layers:
        if (
            config.inner_loop.adapted_layers == -1
            or train.frozen_layers > model.num_layers - config.inner_loop.adapted_layers
        ):
            raise ValueError("frozen_layers must lie below the layers the inner loop adapts")
        for name in frozen_parameter_names(model, train.frozen_layers):
            model.get_parameter(name).requires_grad_(False)
        feature_cache = LowerLayerCache(model, train.frozen_layers)
        logger.info("bottom %d layers frozen; their outputs are cached per text", train.frozen_layers)
    optimizer = torch.optim.AdamW(
        [p for n, p in model.named_parameters() if ".pooler." not in n and p.requires_grad],
        lr=train.outer_lr,
        weight_decay=train.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(train))
    metrics = config.metrics
    metrics.setdefault("curve", [])
    metrics.setdefault("validation", [])
    if training_state is not None:
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        sampler.rng.setstate(training_state["sampler_rng"])
        torch.set_rng_state(training_state["torch_rng"])
        random.setstate(training_state["python_rng"])

    def state() -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "sampler_rng": sampler.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    def run_validation() -> None:
        if not val_set:
            return
        accuracy = round(validate(model, val_set, config.inner_loop), 2)
        metrics["validation"].append({"step": config.step, "accuracy": accuracy})
        best = metrics.get("best_val_accuracy")
        logger.info("step %d: validation accuracy %.2f%% (best %s)", config.step, accuracy, best)
        if best is None or accuracy > best:
            metrics["best_val_accuracy"] = accuracy
            metrics["best_step"] = config.step
            save_checkpoint(output_dir / "best", model, config)

    if config.step == 0:
        run_validation()
    started = time.monotonic()
    running_loss = running_acc = None
    bar = tqdm(total=train.outer_steps, initial=config.step, disable=not progress, desc="meta-train")
    while config.step < train.outer_steps:
        episodes = [sampler.sample() for _ in range(train.meta_batch_size)]
        loss, accuracy = fomaml_step(
            model, episodes, config.inner_loop, optimizer, train.grad_clip, feature_cache=feature_cache
        )
        scheduler.step()
        config.step += 1
        running_loss = loss if running_loss is None else 0.9 * running_loss + 0.1 * loss
        running_acc = accuracy if running_acc is None else 0.9 * running_acc + 0.1 * accuracy
        metrics["curve"].append(
            {"step": config.step, "query_loss": round(loss, 4), "query_accuracy": round(accuracy, 4)}
        )
        bar.update(1)
        bar.set_postfix(meta_loss=f"{running_loss:.3f}", query_acc=f"{running_acc:.3f}")
        out_of_time = train.max_minutes is not None and (time.monotonic() - started) / 60 >= train.max_minutes
        if config.step % train.eval_every == 0 or config.step == train.outer_steps or out_of_time:
            run_validation()
        if config.step % train.save_every == 0:
            save_checkpoint(output_dir / "last", model, config, state())
        if out_of_time:
            logger.info("stopping at step %d: max_minutes=%s reached", config.step, train.max_minutes)
            break
    bar.close()
    metrics["train_seconds"] = round(metrics.get("train_seconds", 0) + time.monotonic() - started, 1)
    save_checkpoint(output_dir / "last", model, config, state())
    if not val_set:
        save_checkpoint(output_dir / "best", model, config)
    return config
