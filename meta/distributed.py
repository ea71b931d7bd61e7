"""Data-parallel meta-training across processes with ``torch.distributed``, launched by torchrun.

Each process (rank) draws its share of the meta-batch (``meta_batch_size / WORLD_SIZE`` episodes,
:func:`metasent.data.episodes.episode_rng` seeds each by run seed, step and episode index), takes
its outer-step gradient, and :func:`average_gradients` replaces every rank's gradient by the mean
over the whole meta-batch before clipping and the optimiser step; the ranks start from rank 0's
parameters (:func:`broadcast_parameters`), so they take identical steps and stay equal. Only rank 0
validates, logs and writes checkpoints.

Without a process group (one process, or torchrun with one process) every function here is a
no-op and :func:`rank`/:func:`world_size` answer 0 and 1: the single-process path is unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .model import resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedEnvironment:
    """Where this process stands in a torchrun launch.

    Args:
        rank (`int`): global rank, 0 to ``world_size - 1`` (``RANK``).
        world_size (`int`): processes in the run, over every node (``WORLD_SIZE``).
        local_rank (`int`): rank on this node, the GPU index it uses (``LOCAL_RANK``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that validates, logs and writes checkpoints."""
        return self.rank == 0


def environment() -> DistributedEnvironment:
    """The torchrun variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (one process without them).

    Raises:
        ValueError: when a variable is not an integer or the rank lies outside the world.
    """
    try:
        env = DistributedEnvironment(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as error:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them): {error}") from None
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"RANK={env.rank} must lie in [0, WORLD_SIZE={env.world_size})")
    return env


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Processes in the process group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def setup(device: str = "auto") -> tuple[DistributedEnvironment, torch.device]:
    """Initialise the process group of a torchrun launch and pick this rank's device.

    With ``WORLD_SIZE`` above 1 the group uses NCCL on CUDA and gloo on the CPU (rendezvous from
    torchrun's ``MASTER_ADDR``/``MASTER_PORT``), and a CUDA device without an index becomes
    ``cuda:LOCAL_RANK``, made the current device. Without torchrun (or with one process) no
    group is made and ``device`` resolves as in a single-process run.

    Args:
        device (`str`, defaults to ``"auto"``): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        `(DistributedEnvironment, torch.device)`: this rank's place and device.

    Raises:
        ValueError: for malformed torchrun variables.
        RuntimeError: when CUDA is asked for and not available.
    """
    env = environment()
    resolved = resolve_device(device)
    if env.world_size == 1:
        return env, resolved
    if resolved.type == "cuda":
        if resolved.index is None:
            resolved = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        device_id = resolved if resolved.type == "cuda" else None  # NCCL binds to this rank's GPU
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, device_id=device_id)
        logger.info("rank %d of %d on %s (%s)", env.rank, env.world_size, resolved, backend)
    return env, resolved


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def teardown() -> None:
    """Leave the process group, if one was initialised (no barrier: a rank that failed must exit,
    so that torchrun stops the others, instead of waiting for them)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_meta_batch(meta_batch_size: int, processes: int) -> int:
    """Episodes each rank draws per outer step.

    Args:
        meta_batch_size (`int`): the total meta-batch over every rank.
        processes (`int`): the world size.

    Returns:
        `int`: ``meta_batch_size // processes``.

    Raises:
        ValueError: when ``meta_batch_size`` does not divide by ``processes``.
    """
    if meta_batch_size < processes or meta_batch_size % processes:
        raise ValueError(
            f"meta_batch_size={meta_batch_size} is the total over every process and must be a multiple of "
            f"WORLD_SIZE={processes} (e.g. --meta-batch-size {processes * max(1, meta_batch_size // processes)})"
        )
    return meta_batch_size // processes


@torch.no_grad()
def broadcast_parameters(tensors: Iterable[Tensor]) -> None:
    """Copy rank 0's values of ``tensors`` (parameters, buffers) to every rank, in place."""
    if not is_distributed():
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def average_gradients(parameters: Iterable[Tensor], weight: float = 1.0) -> None:
    """Replace each parameter's ``.grad`` by the ``weight``-weighted mean over the ranks, in place.

    A rank whose gradient is the mean over ``weight`` items (episodes, examples) thus ends with
    the mean over every rank's items: the gradient one process would take on the whole
    meta-batch. A parameter with a gradient on any rank gets one on every rank (zeros where it
    had none), as it would in that one process. Two all-reduces per call (which tensors have a
    gradient, then every gradient and the weight in one flat buffer); a no-op without a process
    group.

    Args:
        parameters (`Iterable[Tensor]`): the trainable parameters, in the same order on every rank.
        weight (`float`, defaults to 1.0): items this rank's gradient is the mean over.
    """
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    chosen = [p for p, flag in zip(params, has_grad.tolist(), strict=True) if flag]
    pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() * weight for p in chosen]
    flat = torch.cat([*pieces, torch.tensor([float(weight)], device=device)])
    dist.all_reduce(flat)
    mean = flat[:-1] / flat[-1]
    offset = 0
    for p in chosen:
        p.grad = mean[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


def reduce_step_figures(figures: Sequence[float], weight: float, stop: bool) -> tuple[list[float], bool]:
    """The ``weight``-weighted mean of a step's figures (loss, accuracy) over the ranks, and rank
    0's decision to stop, in one all-reduce (every rank stops at the same step).

    Args:
        figures (`Sequence[float]`): this rank's means over its ``weight`` items.
        weight (`float`): items (episodes) behind this rank's figures.
        stop (`bool`): this rank's decision; only rank 0's counts.

    Returns:
        `(list[float], bool)`: the means over every rank's items, and rank 0's decision
        (``figures`` and ``stop`` as given without a process group).
    """
    if not is_distributed():
        return list(figures), stop
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = float(stop and dist.get_rank() == 0)
    packed = torch.tensor([*(f * weight for f in figures), float(weight), flag], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    values = packed.tolist()
    total = values[-2]
    return [v / total for v in values[:-2]], values[-1] > 0
