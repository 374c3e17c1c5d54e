"""Several processes around an unchanged model (torchtitan's habit): a plan in, what the trainer drives out.

- :mod:`.plan`: :class:`ParallelPlan` (data-parallel degree, DDP or FSDP2, pipeline stages and schedule)
  from a :class:`~attnres.train.TrainConfig` and the job's size, and its one-line checks.
- :mod:`.world`: :class:`World` (this rank, from torchrun's environment), :func:`init_distributed`
  (gloo on CPU, NCCL for CUDA tensors) and the few collectives the trainer needs.
- :mod:`.data_parallel`: :func:`parallelize` (``DDP`` or ``fully_shard`` with an fp32 group per AttnRes
  query under a bf16 policy): the ``wrap`` that :func:`attnres.train.train` hands the model.
- :mod:`.checkpoint`: sharded checkpoints with ``torch.distributed.checkpoint`` (atomic, resumable
  on another number of processes) and :func:`export_pretrained` to a plain ``save_pretrained`` directory.

Launch: ``torchrun --nproc_per_node=N -m attnres train ...`` (README, "Several processes"). Names are
imported on first use, so ``import attnres.train`` does not load FSDP or DCP.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "DATA_PARALLEL": "plan",
    "SCHEDULES": "plan",
    "ParallelPlan": "plan",
    "World": "world",
    "DistributedFailure": "world",
    "env_world": "world",
    "init_distributed": "world",
    "shutdown": "world",
    "parallelize": "data_parallel",
    "apply_ddp": "data_parallel",
    "apply_fsdp": "data_parallel",
    "export_pretrained": "checkpoint",
    "full_state_dict": "checkpoint",
    "load_sharded": "checkpoint",
    "save_sharded": "checkpoint",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
