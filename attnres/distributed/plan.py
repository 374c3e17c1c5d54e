"""What parallelism to apply around an unchanged model: the plan (torchtitan's habit).

The world is ``data_parallel x pipeline_stages`` processes. Over the data-parallel ranks the model is
replicated (DDP) or sharded (FSDP2); along a pipeline its decoder layers are cut into
``pipeline_stages * pipeline_virtual`` stages run by a ``torch.distributed.pipelining`` schedule.

:meth:`ParallelPlan.check` is where a plan meets a job: every mistake is one :class:`ConfigError` line,
raised on every rank alike before any process group exists (so a bad plan never hangs a job).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..train.config import ConfigError

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

    def check(self, cfg) -> ParallelPlan:
        """Raise a one-line :class:`ConfigError` if this plan cannot run ``cfg`` (a validated
        TrainConfig) on ``world_size`` processes; returns the plan."""
        check_keys(cfg)
        if self.world_size % self.pipeline_stages:
            raise ConfigError(
                f"the job has {self.world_size} process(es) (torchrun --nnodes x --nproc_per_node), not a multiple "
                f"of pipeline_stages={self.pipeline_stages}; launch a multiple of {self.pipeline_stages} processes"
            )
        if cfg.batch_size % self.data_parallel:
            raise ConfigError(
                f"batch_size={cfg.batch_size} (the global micro-batch) does not split evenly over "
                f"{self.data_parallel} data-parallel ranks; use a multiple of {self.data_parallel}"
            )
        self._check_device(cfg.device)
        if self.pipeline_stages > 1:
            self._check_pipeline(cfg)
        return self

    def _check_device(self, device: str) -> None:
        if self.world_size == 1:
            return
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"device={device!r}: several processes run on cpu (gloo) or cuda (NCCL) only")
        if index:
            raise ConfigError(
                f"device={device!r}: with several processes give device=cuda; each process takes the GPU of "
                f"its LOCAL_RANK (CUDA_VISIBLE_DEVICES picks which GPUs a node uses)"
            )

    def _check_pipeline(self, cfg) -> None:
        try:
            from .pipeline import check_plan
        except ImportError as e:
            raise ConfigError(f"pipeline_stages={self.pipeline_stages}: pipeline parallelism is not "
                              f"available here ({e})") from None
        check_plan(self, cfg.model_config(), cfg.batch_size)


def check_keys(cfg) -> None:
    """The parallelism keys of ``cfg`` on their own (no job needed): one-line :class:`ConfigError`s."""
    if cfg.parallel not in DATA_PARALLEL:
        raise ConfigError(f"parallel must be one of {', '.join(DATA_PARALLEL)}; got {cfg.parallel!r}")
    if cfg.pipeline_schedule not in SCHEDULES:
        raise ConfigError(f"pipeline_schedule must be one of {', '.join(SCHEDULES)}; got {cfg.pipeline_schedule!r}")
    for name, low in (("pipeline_stages", 1), ("pipeline_virtual", 1), ("pipeline_microbatches", 0)):
        if getattr(cfg, name) < low:
            raise ConfigError(f"{name} must be >= {low}, got {getattr(cfg, name)!r}")
    if cfg.parallel == "fsdp" and cfg.optimizer == "muon":
        raise ConfigError(
            "parallel=fsdp with optimizer=muon: Muon orthogonalises whole weight matrices and FSDP shards "
            "them; use parallel=ddp or optimizer=adamw"
        )
