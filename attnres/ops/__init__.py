"""Pure functions on tensors: the AttnRes read and its reference twin."""

from .attn_res import attn_res
from .reference import naive_attn_res
from .two_phase import InterBlock, key_rstd, merged_read, phase1, two_phase_attn_res

__all__ = ["InterBlock", "attn_res", "key_rstd", "merged_read", "naive_attn_res", "phase1", "two_phase_attn_res"]
