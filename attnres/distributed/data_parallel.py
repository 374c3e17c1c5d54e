"""Data parallelism around an unchanged model: DDP (replicas) or FSDP2 (``fully_shard``, shards).

:func:`parallelize` is the ``wrap`` the trainer calls after building the model and before building
the optimizers. DDP returns a wrapper (the optimizers keep the model's own parameters); FSDP2 shards
the model in place (its parameters become ``DTensor`` shards) and returns it.

FSDP2 groups: each decoder layer, then the root (embeddings, final norm, head). With ``bf16`` the
layers and root get a bf16 :class:`MixedPrecisionPolicy` (bf16 compute and all-gathers, fp32 gradient
reduction; the layers take their inputs as they come, bf16 from the embedding), and every AttnRes
:class:`~attnres.residual.DepthQuery` (called as a module by every read, so its hooks fire; the zoo
schemes' parameter modules are read directly and stay in their layer's group) first gets a group of
its own with an fp32 policy that leaves its inputs alone (``cast_forward_inputs=False``), so the
pseudo-queries, their gradients and the depth-softmax math stay fp32 (DISTRIBUTED.md §2).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..train.config import ConfigError
from .plan import ParallelPlan
from .world import World

FP32 = dict(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)


def parallelize(model: nn.Module, plan: ParallelPlan, world: World, device: str, *, bf16: bool = False) -> nn.Module:
    """What the trainer's steps run: ``DDP(model)`` or ``model`` sharded in place (``plan.parallel``)."""
    if plan.pipeline_stages > 1:
        raise ConfigError("parallelize() applies data parallelism only; a pipeline plan is applied by "
                          "attnres.distributed.pipeline.trainer.wrap_pipeline (what `attnres train` uses)")
    if plan.parallel == "fsdp":
        return apply_fsdp(model, cpu_or_cuda_mesh(device, world.size), bf16=bf16)
    return apply_ddp(model, device)


def apply_ddp(model: nn.Module, device: str) -> nn.Module:
    """``DistributedDataParallel`` over the default group; buffers are constants here, so they are synced
    once, at the start, not before every forward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = torch.device(device)
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DDP(model, device_ids=ids, forward_sync_buffers=False)


def cpu_or_cuda_mesh(device: str, size: int):
    """A 1-D mesh of the job on the run's device type: a CPU mesh on CPU (a GPU box with a gloo group must
    not let FSDP move the model to CUDA, pytorch/pytorch#132471)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(torch.device(device).type, (size,))


def apply_fsdp(model: nn.Module, mesh, *, bf16: bool = False) -> nn.Module:
    """Shard ``model`` (an :class:`~attnres.models.AttnResForCausalLM`) in place with ``fully_shard``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from ..residual import DepthQuery

    # a decoder layer returns its state's tensors, some of them views (a Linear's output is one); nothing
    # modifies the state in place, so FSDP2's warning about in-place ops on returned views does not apply
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPDecoderLayer\) returned a view")
    taken: set[int] = set()  # ids of the parameters already in a group
    if bf16:
        _check_bf16(mesh.device_type)
        for name, module in model.named_modules():
            if type(module) is DepthQuery:  # a subclass may read its parameters outside forward (delta's gate)
                _shard(module, name, mesh, MixedPrecisionPolicy(**FP32), taken)
    # a layer's inputs are bf16 already (the bf16 embedding's); casting them would also copy the per-forward
    # context, whose record list the probes fill (FSDP2 rebuilds dataclasses and lists when it casts)
    layer = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                 cast_forward_inputs=False) if bf16 else None
    for i, block in enumerate(model.model.layers):
        _shard(block, f"model.layers.{i}", mesh, layer, taken)
    root = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    _shard(model, "the model's root (embeddings, final norm, head)", mesh, root, taken)
    return model


def _shard(module: nn.Module, name: str, mesh, policy, taken: set[int]) -> None:
    """``fully_shard(module)`` as one group of the parameters not ``taken`` by an inner group, which must
    share one dtype (FSDP2 would assert so only at the first forward)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {p.dtype for p in module.parameters() if id(p) not in taken}
    if len(dtypes) > 1:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ConfigError(
            f"parallel=fsdp: {name} mixes parameter dtypes ({names}) and FSDP2 shards one dtype per group; "
            f"keep the model's parameters in one dtype (float32) and set bf16=true for bf16 compute"
        )
    fully_shard(module, mesh=mesh, mp_policy=policy or MixedPrecisionPolicy())
    taken.update(id(p) for p in module.parameters())


def _check_bf16(device_type: str) -> None:
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("parallel=fsdp with bf16=true: this GPU has no bfloat16 support; set bf16=false")
