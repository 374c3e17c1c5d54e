"""Weight name maps between attnres and other stacks' AttnRes layouts (``attnres convert``).

Layouts (``LAYOUTS``): ``attnres`` (ours), ``k3`` (Kimi-K3 hub names, also vLLM / SGLang / mlx-lm),
``fla`` (fla 0.6), ``torchtitan``, ``megatron`` (PR #6840, hybrid stack), ``gguf`` (llama.cpp names, fused
score vectors). See :mod:`attnres.convert.layouts` for the names and where they were confirmed, and
:mod:`attnres.convert.configs` for the block-size units. :func:`upcycle` (``attnres upcycle``) turns a
pretrained Llama-family model (HF directory, .gguf, ``smollm2-135m``) into an AttnRes checkpoint.
"""

from .errors import ConvertError
from .layouts import LAYOUTS, Layout, ReadNames, get_layout
from .state_dict import MISSING_FINAL, convert, from_layout, plan, to_layout
from .upcycle import upcycle

__all__ = ["LAYOUTS", "MISSING_FINAL", "ConvertError", "Layout", "ReadNames", "convert", "from_layout", "get_layout",
           "plan", "to_layout", "upcycle"]
