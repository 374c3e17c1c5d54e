"""Pure functions on tensors: the AttnRes read and its reference twin."""

from .attn_res import attn_res
from .reference import naive_attn_res

__all__ = ["attn_res", "naive_attn_res"]
