"""Batches (random windows, deterministic per step) and eval_windows (in-order coverage)."""

import numpy as np
import pytest
import torch

from attnres.data import Batches, eval_windows

TOKENS = np.arange(1000, dtype=np.uint16)


def test_batch_of_a_step_is_the_same_on_every_call_and_every_instance():
    a, b = Batches(TOKENS, 4, 16, seed=3), Batches(TOKENS.copy(), 4, 16, seed=3)
    for step in (0, 1, 7, 123456):
        assert torch.equal(a.get(step), b.get(step))
    assert torch.equal(a.get(5), a.get(5))


def test_resume_at_a_step_sees_the_same_batches():
    full = [Batches(TOKENS, 2, 8, seed=1).get(s) for s in range(10)]
    resumed = Batches(TOKENS, 2, 8, seed=1)
    assert all(torch.equal(resumed.get(s), full[s]) for s in range(5, 10))


def test_steps_and_seeds_give_different_batches():
    b = Batches(TOKENS, 4, 16, seed=0)
    assert not torch.equal(b.get(0), b.get(1))
    assert not torch.equal(b.get(0), Batches(TOKENS, 4, 16, seed=1).get(0))


def test_window_starts_follow_default_rng_of_seed_and_step():
    b = Batches(TOKENS, 4, 16, seed=9)
    starts = np.random.default_rng([9, 42]).integers(0, len(TOKENS) - 16 + 1, size=4)
    np.testing.assert_array_equal(b.get(42)[:, 0].numpy(), TOKENS[starts])


def test_windows_are_contiguous_slices_within_range():
    tokens = np.arange(40, dtype=np.uint16)
    b = Batches(tokens, 64, 40 - 3, seed=0)
    starts = set()
    for step in range(20):
        x = b.get(step)
        assert x.dtype == torch.long and x.shape == (64, 37)
        assert torch.equal(x - x[:, :1], torch.arange(37).expand(64, 37))  # contiguous
        assert int(x.min()) >= 0 and int(x.max()) <= 39
        starts |= set(x[:, 0].tolist())
    assert starts == {0, 1, 2, 3}  # every valid start, including the last, is reachable


def test_batches_work_on_a_memmap(tmp_path):
    path = tmp_path / "t.bin"
    TOKENS.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    assert torch.equal(Batches(mm, 3, 10, seed=0).get(2), Batches(TOKENS, 3, 10, seed=0).get(2))


@pytest.mark.parametrize("n,seq_len,batch_size", [(1000, 16, 4), (1000, 10, 7), (64, 64, 2), (99, 10, 100)])
def test_eval_windows_cover_the_split_in_order(n, seq_len, batch_size):
    tokens = np.arange(n, dtype=np.uint16)
    batches = list(eval_windows(tokens, seq_len, batch_size))
    assert all(x.dtype == torch.long and x.shape[1] == seq_len for x in batches)
    assert all(x.shape[0] == batch_size for x in batches[:-1]) and 1 <= batches[-1].shape[0] <= batch_size
    flat = torch.cat(batches).flatten().numpy()
    np.testing.assert_array_equal(flat, tokens[: (n // seq_len) * seq_len])
    assert n - len(flat) < seq_len


def test_eval_windows_stop_at_max_batches():
    batches = list(eval_windows(TOKENS, 10, 3, max_batches=2))
    assert len(batches) == 2
    np.testing.assert_array_equal(torch.cat(batches).flatten().numpy(), TOKENS[:60])
