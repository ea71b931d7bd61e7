"""Dataset readers, the task registry and the N-way K-shot episode sampler.

This package depends on nothing else in metasent (imports flow data <- meta <- app).
"""

from .episodes import Episode, EpisodeSampler, NotEnoughExamplesError
from .readers import Example, read_arsc, read_table
from .registry import Task, TaskRegistry

__all__ = [
    "Episode",
    "EpisodeSampler",
    "Example",
    "NotEnoughExamplesError",
    "Task",
    "TaskRegistry",
    "read_arsc",
    "read_table",
]
