"""The outer loop: meta-training any of the methods of :mod:`meta.algorithms` on episodes from
the source tasks, with validation on held-out tasks, the best checkpoint kept, and resume.

:func:`train` runs ``metasent train`` from its :class:`~meta.config.TrainingArguments` (resume,
init-from, task selection, a distributed launch); :class:`MetaTrainer` is the outer loop itself
(:meth:`MetaTrainer.from_arguments` builds one from the same arguments)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec

import torch
from tqdm.auto import tqdm

from metasent.data.episodes import Episode, EpisodeSampler, NotEnoughExamplesError, episode_rng
from metasent.data.readers import read_table_folders, read_tasks, validation_tasks
from metasent.data.registry import Task, TaskRegistry

from . import distributed
from .algorithms import get, make_outer_loop
from .checkpoint import load_checkpoint, load_training_state, resolve_checkpoint, save_checkpoint
from .config import CheckpointConfig, InnerLoopConfig, TrainConfig, TrainingArguments
from .evaluate import evaluate_episode
from .feature_cache import LowerLayerCache
from .model import MetaLearner, frozen_parameter_names
from .resolve import ArgumentError, checkpoint_config

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


class MetaTrainer:
    """Meta-trains a model with ``config.algorithm``'s outer step (:mod:`meta.algorithms`), reading
    top to bottom in :meth:`train`: sample a meta-batch, take one outer step, schedule the outer
    learning rate, log the curve, validate every ``eval_every`` steps (``<output_dir>/best`` at
    each record) and save ``<output_dir>/last`` every ``save_every`` steps and at the end, with
    the optimiser, scheduler and RNG state for resuming.

    In a process group of several ranks (torchrun, :mod:`meta.distributed`) each rank draws
    ``meta_batch_size / world_size`` episodes of the meta-batch (seeded per episode,
    ``episode_seeds="per_episode"``), the outer step averages the update over the ranks, and
    only rank 0 validates, shows progress and writes checkpoints; rank 0's time limit decides
    for every rank, so all stop at the same step.

    Args:
        model (`MetaLearner`): the meta-learner, trained in place.
        train_tasks (`Sequence[Task]`): meta-training tasks (their ``train`` split).
        val_tasks (`Sequence[Task]`): validation tasks (their ``config.training.val_split``).
        config (`CheckpointConfig`): with ``training`` set; ``step`` and ``metrics`` are updated.
        output_dir (`str | Path`): where checkpoints go.
        training_state (`dict`, *optional*): state from :func:`meta.checkpoint.load_training_state`
            to resume from.
        progress (`bool`, defaults to True): show a tqdm bar with running meta-loss and accuracy.

    Raises:
        ValueError: when ``config.training`` is missing, no training task can supply an episode,
            ``frozen_layers`` reaches the adapted layers, or the algorithm is not meta-trained; in
            a distributed run, when ``meta_batch_size`` does not divide by the world size or the
            algorithm does not average its update over ranks.
    """

    def __init__(
        self,
        model: MetaLearner,
        train_tasks: Sequence[Task],
        val_tasks: Sequence[Task],
        config: CheckpointConfig,
        output_dir: str | Path,
        training_state: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        if config.training is None:
            raise ValueError("config.training must be set for meta-training")
        self.model, self.config, self.args = model, config, config.training
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.per_rank = self._check_distributed()
        self.output_dir, self.progress = Path(output_dir), progress and self.rank == 0
        torch.manual_seed(self.args.seed)
        self.sampler = self._episode_sampler(train_tasks)
        self.val_set = validation_episodes(val_tasks, self.args) if val_tasks else []
        logger.info("meta-training on %d tasks, validating on %d episodes", len(self.sampler.tasks), len(self.val_set))
        model.eval()  # dropout off in both loops, as in the server's adaptation
        feature_cache = self._freeze_lower_layers()
        self.optimizer = torch.optim.AdamW(
            [p for n, p in model.named_parameters() if ".pooler." not in n and p.requires_grad],
            lr=self.args.outer_lr,
            weight_decay=self.args.weight_decay,
        )
        labels = sorted({ex.label for task in self.sampler.tasks for ex in task.split("train")})
        self.outer = make_outer_loop(model, config, self.optimizer, labels, feature_cache)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.args))
        self.metrics = config.metrics
        self.metrics.setdefault("curve", [])
        self.metrics.setdefault("validation", [])
        if training_state is not None:
            self.load_state(training_state)
        extra = list(self.outer.extra.parameters()) if self.outer.extra is not None else []
        distributed.broadcast_parameters([*model.parameters(), *model.buffers(), *extra])  # rank 0's start
        self._started: float | None = None  # monotonic start of this run's outer loop

    @classmethod
    def from_arguments(cls, args: TrainingArguments, device: str | torch.device = "cpu") -> MetaTrainer:
        """The trainer of a ``metasent train`` run: its model and config (fresh, resumed from
        ``args.resume`` or started from ``args.init_from``, :func:`starting_point`) and its tasks
        (:func:`run_tasks`), on ``device``.

        Raises:
            ArgumentError: naming the argument at fault (e.g. ``init_from``, ``extra_data``,
                ``inner_steps``).
            ValueError: as the class (e.g. for an algorithm that is not meta-trained).
        """
        model, config, state = starting_point(args, device)
        train_tasks, val_tasks = run_tasks(args, config)
        return cls(model, list(train_tasks), list(val_tasks), config, args.output, state, args.progress)

    def _check_distributed(self) -> int:
        """Episodes this rank draws per step; switches a distributed run to per-episode seeds.

        Raises:
            ValueError: see the class.
        """
        if self.world_size == 1:
            return self.args.meta_batch_size
        if not get(self.config.algorithm).distributed:
            raise ValueError(
                f"algorithm {self.config.algorithm!r} does not average its outer update over processes: "
                "run it in one process (without torchrun)"
            )
        per_rank = distributed.check_meta_batch(self.args.meta_batch_size, self.world_size)
        if self.args.episode_seeds != "per_episode":
            logger.info("distributed run: episode_seeds=per_episode (one process with it draws the same episodes)")
            self.args.episode_seeds = "per_episode"
        return per_rank

    def meta_batch(self) -> list[Episode]:
        """This rank's episodes of the meta-batch of step ``config.step + 1``: all of them in one
        process with ``episode_seeds="stream"``; else episodes ``rank * per_rank`` to
        ``(rank + 1) * per_rank - 1``, each from :func:`~metasent.data.episodes.episode_rng`."""
        args = self.args
        if args.episode_seeds == "stream":
            return [self.sampler.sample() for _ in range(args.meta_batch_size)]
        first = self.rank * self.per_rank
        indices = range(first, first + self.per_rank)
        return [self.sampler.sample(rng=episode_rng(args.seed, self.config.step, i)) for i in indices]

    def _episode_sampler(self, train_tasks: Sequence[Task]) -> EpisodeSampler:
        args = self.args
        sampler = EpisodeSampler(
            train_tasks, args.n_way, args.k_shot, args.q_query, seed=args.seed, query_sampling=args.query_sampling
        )
        sampler.tasks = usable_tasks(train_tasks, sampler)
        if not sampler.tasks:
            raise ValueError("no meta-training task has enough examples for an episode")
        return sampler

    def _freeze_lower_layers(self) -> LowerLayerCache | None:
        """Freeze the bottom ``frozen_layers`` (and the embeddings) and cache their outputs."""
        frozen, adapted = self.args.frozen_layers, self.config.inner_loop.adapted_layers
        if not frozen:
            return None
        if adapted == -1 or frozen > self.model.num_layers - adapted:
            raise ValueError("frozen_layers must lie below the layers the inner loop adapts")
        for name in frozen_parameter_names(self.model, frozen):
            self.model.get_parameter(name).requires_grad_(False)
        logger.info("bottom %d layers frozen; their outputs are cached per text", frozen)
        return LowerLayerCache(self.model, frozen)

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, scheduler, RNG and extra-module state (saved with ``last`` for resuming)."""
        extra = self.outer.extra
        return {
            "extra": extra.state_dict() if extra is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler_rng": self.sampler.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.rng.setstate(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if self.outer.extra is not None and state.get("extra") is not None:
            self.outer.extra.load_state_dict(state["extra"])

    def _seconds(self) -> float:
        """Meta-training seconds so far, earlier runs (resumed) included."""
        running = time.monotonic() - self._started if self._started is not None else 0.0
        return self.metrics.get("train_seconds", 0.0) + running

    def validate(self) -> None:
        """Score the validation episodes; a new record saves ``<output_dir>/best`` (rank 0 only)."""
        if not self.val_set or self.rank != 0:
            return
        accuracy = round(validate(self.model, self.val_set, self.config.inner_loop), 2)
        step = self.config.step
        self.metrics["validation"].append({"step": step, "seconds": round(self._seconds(), 1), "accuracy": accuracy})
        best = self.metrics.get("best_val_accuracy")
        logger.info("step %d: validation accuracy %.2f%% (best %s)", step, accuracy, best)
        if best is None or accuracy > best:
            self.metrics["best_val_accuracy"] = accuracy
            self.metrics["best_step"] = step
            save_checkpoint(self.output_dir / "best", self.model, self.config)

    def _out_of_time(self) -> bool:
        limit = self.args.max_minutes
        return limit is not None and self._started is not None and (time.monotonic() - self._started) / 60 >= limit

    def train(self) -> CheckpointConfig:
        """Run the outer loop to ``outer_steps`` (or ``max_minutes``).

        Returns:
            `CheckpointConfig`: the final config (also saved in ``<output_dir>/last``).
        """
        args, config = self.args, self.config
        if config.step == 0:
            self.validate()  # the starting point of the learning curve
        self._started = time.monotonic()
        running_loss = running_acc = None
        bar = tqdm(total=args.outer_steps, initial=config.step, disable=not self.progress, desc="meta-train")
        while config.step < args.outer_steps:
            episodes = self.meta_batch()
            loss, accuracy = self.outer.step(episodes)  # query loss (reptile, multitask: training loss)
            self.scheduler.step()
            config.step += 1
            # the whole meta-batch's figures, and rank 0's time limit for every rank
            (loss, accuracy), out_of_time = distributed.reduce_step_figures(
                (loss, accuracy), len(episodes), self._out_of_time()
            )
            running_loss = loss if running_loss is None else 0.9 * running_loss + 0.1 * loss
            running_acc = accuracy if running_acc is None else 0.9 * running_acc + 0.1 * accuracy
            self.metrics["curve"].append(
                {
                    "step": config.step,
                    "seconds": round(self._seconds(), 1),
                    "query_loss": round(loss, 4),
                    "query_accuracy": round(accuracy, 4),
                }
            )
            bar.update(1)
            bar.set_postfix(meta_loss=f"{running_loss:.3f}", query_acc=f"{running_acc:.3f}")
            if config.step % args.eval_every == 0 or config.step == args.outer_steps or out_of_time:
                self.validate()
            if config.step % args.save_every == 0:
                self._save_last()
            if out_of_time:
                logger.info("stopping at step %d: max_minutes=%s reached", config.step, args.max_minutes)
                break
        bar.close()
        self.metrics["train_seconds"] = round(self._seconds(), 1)
        self._started = None
        self._save_last()
        if not self.val_set and self.rank == 0:
            save_checkpoint(self.output_dir / "best", self.model, config)
        distributed.barrier()  # every rank returns once the checkpoints are written (no-op in one process)
        return config

    def _save_last(self) -> None:
        """``<output_dir>/last`` with the training state (rank 0 only: the ranks' models are equal)."""
        if self.rank == 0:
            save_checkpoint(self.output_dir / "last", self.model, self.config, self.state_dict())


P = ParamSpec("P")


def _trained(trainer: Callable[P, MetaTrainer]) -> Callable[P, CheckpointConfig]:
    def run(*args: P.args, **kwargs: P.kwargs) -> CheckpointConfig:
        return trainer(*args, **kwargs).train()

    return run


meta_train = _trained(MetaTrainer)
meta_train.__doc__ = """Meta-train ``model``: :class:`MetaTrainer` with these arguments (its signature, its
errors), then :meth:`~MetaTrainer.train`; returns the final config (also saved in
``<output_dir>/last``)."""

RESUME_OPTIONS = ("outer_steps", "max_minutes", "eval_every", "save_every")
"""The arguments that still apply with ``resume`` (the checkpoint's other settings do)."""


def init_from_checkpoint(model: MetaLearner, source: str, device: str | torch.device) -> None:
    """Load ``source``'s meta-learned tensors into ``model`` (prepared for this run's inner loop).

    Inner learning rates the source has for tensors this run does not adapt are dropped; tensors
    the source lacks (new adapters or Meta-SGD rates) keep their fresh values.

    Args:
        model (`MetaLearner`): the new run's model, changed in place.
        source (`str`): a checkpoint or compact-model directory, or ``"default"`` (the shipped model).
        device (`str | torch.device`): where the source is loaded.

    Raises:
        ArgumentError: (argument ``init_from``) when ``source`` is no checkpoint, or it has other
            tensors than the model (another encoder or LoRA layout), or shapes differ.
    """
    path = resolve_checkpoint(source)
    if path is None:
        raise ArgumentError("init_from", "give a checkpoint directory or 'default'")
    try:
        loaded, _ = load_checkpoint(path, device)
    except FileNotFoundError as error:
        raise ArgumentError("init_from", str(error)) from error
    own = model.state_dict()
    tensors = {n: t for n, t in loaded.state_dict().items() if n in own or "inner_log_lr" not in n}
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as error:  # a shape differs: another LoRA rank or encoder
        raise ArgumentError("init_from", f"{path} does not fit this run's model: {error}") from error
    if unexpected:
        message = f"{path} has tensors this run's model lacks (another encoder or LoRA layout?): {unexpected[:3]}"
        raise ArgumentError("init_from", message)
    logger.info("meta-parameters from %s; fresh: %s", path, ", ".join(missing) or "none")


def starting_point(
    args: TrainingArguments, device: str | torch.device
) -> tuple[MetaLearner, CheckpointConfig, dict[str, Any] | None]:
    """The model, config and training state a run starts from: a ``resume`` checkpoint (a 'last'
    one, or a compact model with a fresh optimiser state; ``RESUME_OPTIONS`` still apply), else
    a new model with the config :func:`meta.resolve.checkpoint_config` resolves, its
    meta-parameters from ``init_from`` when given. Seeds torch with ``args.seed`` first (the
    initial LoRA tensors are the same in every run of a seed).

    Raises:
        ArgumentError: naming the argument at fault.
    """
    new = checkpoint_config(args)  # checks the algorithm and the inner loop, also when resuming
    torch.manual_seed(args.seed)
    if args.resume is not None:
        model, config = load_checkpoint(args.resume, device)
        if config.training is not None:  # how long to go on and how often to validate may change
            longer = {k: getattr(args, k) for k in RESUME_OPTIONS if k in args.model_fields_set}
            config.training = config.training.model_copy(update=longer)
        return model, config, load_training_state(args.resume)
    model = MetaLearner.from_pretrained(new.encoder).prepare(new.inner_loop).to(device)
    if args.init_from is not None:
        init_from_checkpoint(model, args.init_from, device)
    return model, new, None


def run_tasks(args: TrainingArguments, config: CheckpointConfig) -> tuple[TaskRegistry, TaskRegistry]:
    """The run's training tasks (``data`` and ``extra_data`` but the held-out and validation
    domains, with a ``train`` split) and validation tasks (with the ``val_split``); a resumed
    run keeps the domains it started with.

    A validation domain of the extra data is held out of meta-training whole and validated on
    (:func:`metasent.data.readers.validation_tasks`).

    Raises:
        ArgumentError: (``extra_data``) for a missing extra file or a domain also in ``data``;
            (``val_domains``) for a validation domain found in neither.
    """
    training = config.training
    held_out = training.exclude_domains if training else args.exclude_domains
    val = training.val_domains if training else args.val_domains
    train_tasks = read_tasks(args.data, exclude=held_out + val).select(require_split="train")
    val_split = training.val_split if training else args.val_split
    extra = args.extra_data or (training.extra_data if training else [])
    try:
        val_tasks = validation_tasks(args.data, extra, val, val_split) if val else TaskRegistry([])
    except (FileNotFoundError, ValueError) as error:
        raise ArgumentError("val_domains", str(error)) from error
    if extra:
        try:
            train_tasks = TaskRegistry([*train_tasks, *read_table_folders(extra, exclude=held_out + val)])
        except (FileNotFoundError, ValueError) as error:  # a missing file, or a domain of --data again
            raise ArgumentError("extra_data", str(error)) from error
    return train_tasks, val_tasks


def train(args: TrainingArguments) -> dict[str, Any] | None:
    """One ``metasent train`` run, in this process or as one rank of a torchrun launch.

    Meta-trains ``args.algorithm`` (:class:`MetaTrainer`), or for an algorithm that is not
    meta-trained writes the starting model as ``best`` and ``last`` under ``args.output``.

    Args:
        args (`TrainingArguments`): the run.

    Returns:
        `dict | None`: on rank 0, what ``metasent train`` prints: the final validation metrics
        (without the curve), or the algorithm and checkpoint of a run that is not meta-trained;
        ``None`` on the other ranks.

    Raises:
        ArgumentError: naming the argument at fault (``meta_batch_size`` when it does not divide
            by the processes of a distributed run).
        ValueError: as :class:`MetaTrainer`.
    """
    env = distributed.environment()
    if env.world_size > 1:
        try:
            distributed.check_meta_batch(args.meta_batch_size, env.world_size)
        except ValueError as error:
            raise ArgumentError("meta_batch_size", str(error)) from error
    _, device = distributed.setup(args.device)
    try:
        model, config, state = starting_point(args, device)
        train_tasks, val_tasks = run_tasks(args, config)
        if not get(config.algorithm).meta_trained:  # transfer learning: nothing to meta-train
            config.training = None
            if env.is_main:
                for name in ("best", "last"):
                    save_checkpoint(args.output / name, model, config)
            return {"algorithm": config.algorithm, "checkpoint": str(args.output / "best")} if env.is_main else None
        logger.info("training tasks: %s", ", ".join(t.name for t in train_tasks))
        final = meta_train(model, list(train_tasks), list(val_tasks), config, args.output, state, args.progress)
    finally:
        distributed.teardown()
    return {k: v for k, v in final.metrics.items() if k != "curve"} if env.is_main else None
