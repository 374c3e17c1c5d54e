"""Who this process is in a job, from torchrun's environment, and the few collectives the trainer needs.

A :class:`World` of size 1 (no ``WORLD_SIZE``, or 1) is a plain single process: every method is the
identity and nothing touches ``torch.distributed``. Otherwise :func:`init_distributed` starts the default
process group: gloo for CPU tensors, plus NCCL for CUDA tensors when the run is on CUDA.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..train.config import ConfigError

T = TypeVar("T")


class DistributedFailure(RuntimeError):
    """A collective failed: another process of the job died or became unreachable."""


class RankError(ConfigError):
    """A user error of this process alone (its environment, its GPU), which the other ranks may not
    share: every rank reports its own, where an error of the run's config is reported by rank 0."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints progress and writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous rows of a global batch (the plan checked that they split evenly)."""
        if not self.distributed:
            return batch
        n = batch.shape[0] // self.size
        return batch[self.rank * n : (self.rank + 1) * n]

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of each rank's ``t`` (a new tensor; one all-reduce)."""
        if not self.distributed:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.size

    def max(self, x: int) -> int:
        """The largest of the ranks' ``x`` (one all-reduce of a CPU integer)."""
        if not self.distributed:
            return x
        t = torch.tensor([x], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return self.max(0 if flag else 1) == 0

    def on_main(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` run on rank 0 only; every rank returns its result, or raises its
        exception (so an error there stops all ranks alike instead of leaving them waiting)."""
        if not self.distributed:
            return fn(*args, **kwargs)
        box: list[Any] = [None]
        error = None
        if self.is_main:
            try:
                box[0] = (True, fn(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                error, box[0] = e, (False, _picklable(e))
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise error if error is not None else value
        return value

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def failures(self):
        """Turn a collective that failed because another process of the job is gone into a one-line
        :class:`DistributedFailure` (the launcher's own report names the process that died first)."""
        try:
            yield
        except Exception as e:
            if not self.distributed or not _lost_peer(e):
                raise
            raise DistributedFailure(
                f"rank {self.rank}: lost contact with the other processes of the job ({_first_line(e)}); another "
                f"process probably died (the launcher's report names it); the last checkpoint is intact: rerun the "
                f"same command with --resume to continue from it"
            ) from e


def _first_line(e: BaseException) -> str:
    """The gist of a collective's error: gloo's source location and advice cut off."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())
    return text.splitlines()[0].split(". ")[0][:200] if text else type(e).__name__


def _lost_peer(e: BaseException) -> bool:
    """``e`` (or what it was raised from) is a failed collective: torch.distributed's own error types,
    or gloo's transport errors, which reach Python as a plain RuntimeError."""
    while e is not None:
        if isinstance(e, dist.DistError):
            return True
        if isinstance(e, RuntimeError) and any(s in str(e) for s in _GLOO_LOST):
            return True
        e = e.__cause__ or e.__context__
    return False


_GLOO_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport")


def _picklable(e: Exception) -> Exception:
    """``e`` if it survives pickling (a ConfigError does), else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - an exception class with a custom __init__
        return RuntimeError(f"rank 0: {type(e).__name__}: {e}")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RankError(f"{name}={value!r} in the environment is not an integer (torchrun sets it)") from None


def env_world() -> World:
    """This process's place in the job, from ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by
    torchrun); a single process when they are unset. Starts nothing."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise RankError(f"RANK={rank} and WORLD_SIZE={size} in the environment do not fit together")
    return World(rank, size, _env_int("LOCAL_RANK", 0))


def init_distributed(device: str = "cpu") -> World:
    """Join the job torchrun started (default process group; once per process) and return this rank's
    :class:`World`. ``device`` is the run's: on ``cuda`` each process takes ``cuda:LOCAL_RANK`` and CUDA
    tensors travel over NCCL; CPU tensors always go over gloo."""
    world = env_world()
    if not world.distributed or dist.is_initialized():
        return world
    if not dist.is_available():
        raise ConfigError("this torch is built without torch.distributed; run one process")
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError(f"WORLD_SIZE={world.size} but no MASTER_ADDR: launch several processes with "
                          f"torchrun (README, 'Several processes')")
    backend = "gloo"
    if torch.device(device).type == "cuda":
        _take_gpu(world)
        backend = "cpu:gloo,cuda:nccl" if dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend)
    return world


def _take_gpu(world: World) -> None:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world.local_rank >= n:
        raise RankError(f"LOCAL_RANK={world.local_rank} has no GPU: this node shows {n}; "
                          f"use --nproc_per_node <= {n} or device=cpu")
    torch.cuda.set_device(world.local_rank)


def shutdown() -> None:
    """Leave the job (destroy the default process group) if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
