"""The task registry: which tasks exist, their domain, label names and splits."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .readers import Example


@dataclass
class Task:
    """One classification task (a domain, or a domain at one rating threshold in ARSC).

    Args:
        name (`str`): unique task name, e.g. ``"books.t2"``.
        domain (`str`): the domain it belongs to, e.g. ``"books"``.
        labels (`tuple[str, ...]`): its label names (2 or more).
        splits (`dict[str, list[Example]]`): examples per split (``train``, ``dev``, ``test``).
    """

    name: str
    domain: str
    labels: tuple[str, ...]
    splits: dict[str, list[Example]] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        """The examples of split ``name``.

        Raises:
            KeyError: when the task has no such split (the message lists the ones it has).
        """
        if name not in self.splits:
            raise KeyError(f"task {self.name!r} has no {name!r} split (has {sorted(self.splits)})")
        return self.splits[name]


class TaskRegistry:
    """A named collection of tasks with selection by domain.

    Example::

        registry = TaskRegistry(read_arsc("../shared/data/arsc"))
        train = registry.select(exclude=["books", "dvd"], require_split="train")
    """

    def __init__(self, tasks: Iterable[Task]) -> None:
        self._tasks: dict[str, Task] = {}
        for task in tasks:
            if task.name in self._tasks:
                raise ValueError(f"duplicate task name {task.name!r}")
            if len(set(task.labels)) < 2:
                raise ValueError(f"task {task.name!r} needs at least 2 labels, has {task.labels}")
            self._tasks[task.name] = task

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def __getitem__(self, name: str) -> Task:
        if name not in self._tasks:
            raise KeyError(f"unknown task {name!r}; known: {', '.join(self.names)}")
        return self._tasks[name]

    @property
    def names(self) -> list[str]:
        """Task names, in registration order."""
        return list(self._tasks)

    @property
    def domains(self) -> list[str]:
        """Distinct domain names, sorted."""
        return sorted({task.domain for task in self._tasks.values()})

    def select(
        self,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        require_split: str | None = None,
    ) -> TaskRegistry:
        """A new registry with the tasks whose domain is in ``include`` (all when ``None``) and
        not in ``exclude``, and which have ``require_split`` when given.

        Raises:
            ValueError: when ``include`` names a domain that is not registered.
        """
        include_set = set(include) if include is not None else None
        exclude_set = set(exclude or ())
        if include_set is not None:
            unknown = include_set - set(self.domains)
            if unknown:
                raise ValueError(f"unknown domains {sorted(unknown)}; known: {self.domains}")
        return TaskRegistry(
            task
            for task in self._tasks.values()
            if (include_set is None or task.domain in include_set)
            and task.domain not in exclude_set
            and (require_split is None or task.splits.get(require_split))
        )
