"""The outer loop: meta-training any of the methods of :mod:`meta.algorithms` on episodes from
the source tasks, with validation on held-out tasks, the best checkpoint kept, and resume."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metasent.data.episodes import Episode, EpisodeSampler, NotEnoughExamplesError
from metasent.data.registry import Task

from .algorithms import make_outer_loop
from .checkpoint import save_checkpoint
from .config import CheckpointConfig, InnerLoopConfig, TrainConfig
from .evaluate import evaluate_episode
from .feature_cache import LowerLayerCache
from .model import MetaLearner, frozen_parameter_names

logger = logging.getLogger(__name__)


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
                query_sampling=sampler.query_sampling,
            ).sample()
            usable.append(task)
        except (NotEnoughExamplesError, KeyError) as error:
            logger.warning("skipping task %s: %s", task.name, error)
    return usable


def validation_episodes(tasks: Sequence[Task], config: TrainConfig) -> list[Episode]:
    """Fixed validation episodes: ``val_episodes`` per task from ``val_split``, K-shot support
    and ``val_q_query`` query examples per class (N * ``val_q_query`` at the task's own class
    proportions with ``query_sampling="natural"``), from seed ``config.seed + 1``."""
    sampler = EpisodeSampler(
        tasks,
        config.n_way,
        config.k_shot,
        q_query=config.val_q_query,
        support_split=config.val_split,
        seed=config.seed + 1,
        query_sampling=config.query_sampling,
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
    """Meta-train ``model`` with ``config.algorithm`` (:func:`meta.algorithms.make_outer_loop`);
    write ``<output_dir>/last`` every ``save_every`` steps and at the end, and
    ``<output_dir>/best`` at each validation record.

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
        ValueError: when no training task can supply an episode, or the algorithm is not
            meta-trained.
    """
    train = config.training
    if train is None:
        raise ValueError("config.training must be set for meta-training")
    output_dir = Path(output_dir)
    torch.manual_seed(train.seed)
    sampler = EpisodeSampler(
        train_tasks, train.n_way, train.k_shot, train.q_query, seed=train.seed, query_sampling=train.query_sampling
    )
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
    labels = sorted({ex.label for task in sampler.tasks for ex in task.split("train")})
    outer = make_outer_loop(model, config, optimizer, labels, feature_cache)
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
        if outer.extra is not None and "extra" in training_state:
            outer.extra.load_state_dict(training_state["extra"])

    def state() -> dict[str, Any]:
        return {
            "extra": outer.extra.state_dict() if outer.extra is not None else None,
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
        elapsed = round(metrics.get("train_seconds", 0.0) + (time.monotonic() - started if started else 0.0), 1)
        metrics["validation"].append({"step": config.step, "seconds": elapsed, "accuracy": accuracy})
        best = metrics.get("best_val_accuracy")
        logger.info("step %d: validation accuracy %.2f%% (best %s)", config.step, accuracy, best)
        if best is None or accuracy > best:
            metrics["best_val_accuracy"] = accuracy
            metrics["best_step"] = config.step
            save_checkpoint(output_dir / "best", model, config)

    started = 0.0
    if config.step == 0:
        run_validation()
    started = time.monotonic()
    seconds_before = metrics.get("train_seconds", 0.0)
    running_loss = running_acc = None
    bar = tqdm(total=train.outer_steps, initial=config.step, disable=not progress, desc="meta-train")
    while config.step < train.outer_steps:
        episodes = [sampler.sample() for _ in range(train.meta_batch_size)]
        loss, accuracy = outer.step(episodes)  # query loss (reptile, multitask: training loss)
        scheduler.step()
        config.step += 1
        running_loss = loss if running_loss is None else 0.9 * running_loss + 0.1 * loss
        running_acc = accuracy if running_acc is None else 0.9 * running_acc + 0.1 * accuracy
        metrics["curve"].append(
            {
                "step": config.step,
                "seconds": round(seconds_before + time.monotonic() - started, 1),
                "query_loss": round(loss, 4),
                "query_accuracy": round(accuracy, 4),
            }
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
