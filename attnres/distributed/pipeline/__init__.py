"""Pipeline parallelism for :class:`~attnres.models.AttnResForCausalLM` on ``torch.distributed.pipelining``
(every schedule torch 2.13 ships), with the cross-stage block cache of PAPER §4.1 for Block/Full AttnRes.

- :mod:`.layout`: the routing table (pure Python): what every hop carries, naive or cached, and its bytes.
- :mod:`.store` / :mod:`.stage`: the rank-local store of completed blocks and the torch stage around it.
- :mod:`.runtime`: :func:`check_plan`, :func:`build_pipeline` and the :class:`Pipeline` driver
  (``step(input_ids, labels)``, ``eval_loss(input_ids, labels)``).
- :mod:`.trainer`: ``attnres train`` through the stages: :class:`~.trainer.PipelineTrainer` (the trainer's
  loop with the pipeline's step, gradient norm and evaluation) and its one-line refusals (``check_trainable``).
"""

from .layout import Hop, Layout, even_split, paper_cached, paper_naive, placement
from .runtime import SCHEDULE_CLASSES, Pipeline, build_pipeline, check_plan, microbatches, next_token_loss
from .stage import CachedStage, StageModule
from .store import PipelineStoreError, RankStore

__all__ = [
    "SCHEDULE_CLASSES",
    "CachedStage",
    "Hop",
    "Layout",
    "Pipeline",
    "PipelineStoreError",
    "RankStore",
    "StageModule",
    "build_pipeline",
    "check_plan",
    "even_split",
    "microbatches",
    "next_token_loss",
    "paper_cached",
    "paper_naive",
    "placement",
]
