"""N-way K-shot episodes: a support set to adapt on and a query set to score the adapted model.

The protocol is the one of Vinyals et al. (2016) and Finn et al. (2017): each episode draws N
classes of one task, K support and Q query examples per class, with no example in both sets.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .readers import Example
from .registry import Task


class NotEnoughExamplesError(ValueError):
    """A task has too few examples of a class for the requested episode."""


@dataclass(frozen=True)
class Episode:
    """One few-shot episode.

    Args:
        task (`str`): the task it was drawn from.
        labels (`tuple[str, ...]`): the N class names, sorted; label ids index this tuple.
        support (`list[Example]`): N*K examples to adapt on.
        query (`list[Example]`): the examples the adapted model is scored on.
    """

    task: str
    labels: tuple[str, ...]
    support: list[Example]
    query: list[Example]


def episode_rng(seed: int, step: int, index: int) -> random.Random:
    """The generator of episode ``index`` of outer step ``step``'s meta-batch in a run seeded with
    ``seed``: a function of those three numbers only, so that a meta-batch split across processes
    (each drawing its own indices) holds the episodes one process draws, and a resumed run draws
    what an uninterrupted one would have.

    Returns:
        `random.Random`: a fresh generator (string seeds are hashed with SHA-512 by ``random``).
    """
    return random.Random(f"metasent-episode:{seed}:{step}:{index}")


def _by_label(examples: Sequence[Example]) -> dict[str, list[int]]:
    indices: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        indices[example.label].append(index)
    return indices


def fixed_episode(task: Task, support_split: str = "train", query_split: str = "test") -> Episode:
    """The ARSC protocol episode: the whole ``support_split`` is the support set and the whole
    ``query_split`` the query set (for the 12 ARSC test tasks ``.train`` holds exactly 5 examples
    per class).

    Raises:
        KeyError: when the task lacks one of the splits.
    """
    support, query = task.split(support_split), task.split(query_split)
    labels = tuple(sorted({ex.label for ex in support}))
    return Episode(task=task.name, labels=labels, support=list(support), query=list(query))


class EpisodeSampler:
    """Samples N-way K-shot episodes from tasks, reproducibly from a seed.

    Args:
        tasks (`Sequence[Task]`): tasks to draw from (uniformly).
        n_way (`int`, defaults to 2): classes per episode; tasks with more labels are subsampled.
        k_shot (`int`, defaults to 5): support examples per class.
        q_query (`int | None`, defaults to 8): query examples per class; ``None`` takes every
            remaining example (all of ``query_split`` when it differs from ``support_split``).
        support_split (`str`, defaults to ``"train"``): split the support set comes from.
        query_split (`str | None`, *optional*): split the query set comes from (default: the
            support split, without overlap).
        seed (`int`, defaults to 0): seed of the sampler's own random generator.
        query_sampling (`str`, defaults to ``"balanced"``): ``"balanced"`` takes Q query
            examples per class; ``"natural"`` takes N*Q (or, with ``q_query=None``, all) of the
            remaining examples of the episode's classes at random, so the query set keeps the
            task's own class proportions (as real test sets do).

    Raises:
        ValueError: when ``tasks`` is empty, ``n_way < 2``, ``k_shot < 1`` or ``query_sampling``
            is unknown.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        n_way: int = 2,
        k_shot: int = 5,
        q_query: int | None = 8,
        support_split: str = "train",
        query_split: str | None = None,
        seed: int = 0,
        query_sampling: str = "balanced",
    ) -> None:
        if not tasks:
            raise ValueError("EpisodeSampler needs at least one task")
        if query_sampling not in ("balanced", "natural"):
            raise ValueError(f"query_sampling must be 'balanced' or 'natural', got {query_sampling!r}")
        self.query_sampling = query_sampling
        if n_way < 2 or k_shot < 1 or (q_query is not None and q_query < 1):
            raise ValueError(f"need n_way >= 2, k_shot >= 1, q_query >= 1; got {n_way}/{k_shot}/{q_query}")
        self.tasks = list(tasks)
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.support_split = support_split
        self.query_split = query_split or support_split
        self.rng = random.Random(seed)

    def sample(self, task: Task | None = None, rng: random.Random | None = None) -> Episode:
        """Draw one episode from ``task`` (default: a task drawn uniformly).

        Args:
            task (`Task`, *optional*): the task (default: drawn uniformly from the sampler's).
            rng (`random.Random`, *optional*): the generator to draw with (default: the
                sampler's own stream, :attr:`rng`), e.g. :func:`episode_rng`'s.

        Raises:
            NotEnoughExamplesError: when a class of the task has fewer than K (+ Q) examples.
        """
        rng = self.rng if rng is None else rng
        task = task if task is not None else rng.choice(self.tasks)
        pool = task.split(self.support_split)
        support_by_label = _by_label(pool)
        same_split = self.query_split == self.support_split
        query_pool = pool if same_split else task.split(self.query_split)
        query_by_label = support_by_label if same_split else _by_label(query_pool)
        candidates = sorted(label for label in support_by_label if label in query_by_label)
        if len(candidates) < self.n_way:
            raise NotEnoughExamplesError(
                f"task {task.name!r} has {len(candidates)} labels with examples in both splits, "
                f"an episode needs n_way={self.n_way}"
            )
        labels = tuple(sorted(rng.sample(candidates, self.n_way)))
        support: list[Example] = []
        query: list[Example] = []
        natural = self.query_sampling == "natural"
        for label in labels:
            indices = list(support_by_label[label])
            rng.shuffle(indices)
            # Support and query from one split must not overlap: K + Q (at least K + 1) needed.
            needed = self.k_shot + ((1 if natural else self.q_query or 1) if same_split else 0)
            if len(indices) < needed:
                raise NotEnoughExamplesError(
                    f"task {task.name!r}, label {label!r}: {len(indices)} examples in "
                    f"{self.support_split!r}, an episode needs {needed} "
                    f"(k_shot={self.k_shot}, q_query={self.q_query})"
                )
            support.extend(pool[i] for i in indices[: self.k_shot])
            if same_split:
                rest = indices[self.k_shot :]
            else:
                rest = list(query_by_label[label])
                rng.shuffle(rest)
                if self.q_query is not None and not natural and len(rest) < self.q_query:
                    raise NotEnoughExamplesError(
                        f"task {task.name!r}, label {label!r}: {len(rest)} examples in "
                        f"{self.query_split!r}, q_query={self.q_query} needed"
                    )
            chosen = rest if self.q_query is None or natural else rest[: self.q_query]
            query.extend(query_pool[i] for i in chosen)
        if natural:  # a uniform draw from the classes' remaining examples keeps their proportions
            rng.shuffle(query)
            if self.q_query is not None:
                query = query[: self.q_query * self.n_way]
        return Episode(task=task.name, labels=labels, support=support, query=query)

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()
