"""mHC-lite (ZOO.md §2.3; arXiv 2601.05732, code ``FFTYYY/mhc-lite``), the AttnRes paper's Table 2 reference.

mHC (``mhc.py``) with H_res an exact convex combination of permutation matrices (Birkhoff-von Neumann):
H_res = sum_r a_r P_r over all n! permutations (index 0 the identity), a = softmax(a_res x' W_res + b_res),
W_res ``[n!, nD]`` (``phi_res``) zero-init, b_res 0 for the identity and -8 for the others. Doubly
stochastic exactly, no Sinkhorn iterations; parameters grow as n!, so ``hyper_streams`` <= 5. Everything
else (streams, H_pre, H_post, ``mhc_init``, state, output) is mHC's.
"""

from __future__ import annotations

from .hc import STREAMS
from .keys import Key
from .mhc import INIT, ManifoldHyperConnections

LITE_STREAMS = Key(STREAMS.name, STREAMS.default, STREAMS.doc + " (mHC-lite: n! permutations, so at most 5)",
                   unit=STREAMS.unit, minimum=1, maximum=5)


class MHCLite(ManifoldHyperConnections):
    name = "mhc_lite"
    keys = (LITE_STREAMS, INIT)

    def __init__(self, num_sublayers: int, eps: float = 1e-6, hyper_streams: int = 4, mhc_init: str = "paper"):
        super(ManifoldHyperConnections, self).__init__(num_sublayers, eps)
        self._setup(LITE_STREAMS.validate(hyper_streams), "birkhoff", INIT.validate(mhc_init), 0)
