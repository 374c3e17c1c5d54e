"""What parallelism to apply around an unchanged model: the plan (torchtitan's habit).

The world is ``data_parallel x pipeline_stages`` processes. Over the data-parallel ranks the model is
replicated (DDP) or sharded (FSDP2); along a pipeline its decoder layers are cut into
``pipeline_stages * pipeline_virtual`` stages run by a ``torch.distributed.pipelining`` schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

DATA_PARALLEL = ("ddp", "fsdp")
SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble",
             "DualPipeV")


@dataclass(frozen=True)
class ParallelPlan:
    world_size: int = 1
    parallel: str = "ddp"  # over the data-parallel ranks: "ddp" or "fsdp"
    pipeline_stages: int = 1  # P
    pipeline_virtual: int = 1  # V
    pipeline_schedule: str = "1F1B"
    pipeline_microbatches: int = 0  # 0: P * V
    pipeline_cache: bool = True

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.pipeline_stages

    @classmethod
    def from_config(cls, cfg, world_size: int) -> ParallelPlan:
        """The plan of a :class:`attnres.train.TrainConfig` for a job of ``world_size`` processes."""
        return cls(world_size, cfg.parallel, cfg.pipeline_stages, cfg.pipeline_virtual, cfg.pipeline_schedule,
                   cfg.pipeline_microbatches, cfg.pipeline_cache)
