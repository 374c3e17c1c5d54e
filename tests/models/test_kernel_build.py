"""The fused CPU read is built when an AttnRes model is built (not inside a forward), and a failed build
is reported once while reads go on through the PyTorch ops."""

import pytest
from torch.utils import cpp_extension

from attnres import AttnResForCausalLM
from attnres.ops import cpu_kernel

from .test_model import ids, tiny


def test_an_attnres_model_prepares_the_cpu_kernel_when_built(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernel, "prepare", lambda: calls.append(1) or True)
    AttnResForCausalLM(tiny("standard"))
    assert calls == []  # no AttnRes read, no kernel
    AttnResForCausalLM(tiny("block"))
    assert calls == [1]


def test_a_failed_kernel_build_warns_once_and_reads_still_work(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_ext", None)
    monkeypatch.setattr(cpu_kernel, "_failed", None)
    monkeypatch.setattr(cpu_kernel, "_name", lambda: "attnres_read_cpu_test_failed_build")

    def broken(**kw):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.warns(UserWarning, match="did not build") as caught:
        models = [AttnResForCausalLM(tiny("block")).double() for _ in range(2)]
        x = ids(t=40)
        for m in models:
            m(x, labels=x).loss.backward()
    assert len([w for w in caught if "did not build" in str(w.message)]) == 1
    assert cpu_kernel.unavailable_reason() == "RuntimeError: no compiler"
