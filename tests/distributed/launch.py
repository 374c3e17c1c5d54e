"""Start real processes for the distributed tests: ``torch.multiprocessing`` workers or a torchrun job.

Each process runs one OpenMP thread (``OMP_NUM_THREADS=1``) over gloo on CPU; a hung job is killed at
its timeout instead of hanging the test run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args, nprocs: int = 2, timeout: float = 240.0) -> None:
    """Run ``fn(rank, nprocs, port, *args)`` in ``nprocs`` fresh processes; a worker's exception fails the
    test with its traceback."""
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the children's (they read it when they start)
    try:
        ctx = mp.start_processes(fn, args=(nprocs, free_port(), *args), nprocs=nprocs, join=False,
                                 start_method="spawn")
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} did not finish within {timeout:.0f}s")


def torchrun(args: list[str], nproc: int = 2, env: dict[str, str] | None = None,
             timeout: float = 240.0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc ARGS`` from the repository root, output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
