"""Checkpoints: atomic, newest K kept, every RNG state restored."""

from __future__ import annotations

import random

import numpy as np
import torch

from holly_hpc.runtime.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_keep_last_k_and_ignore_partial_writes(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    # An interrupted write leaves only a temp file: never mistaken for a checkpoint.
    (tmp_path / ".step_00000050.pt.tmp-123").write_bytes(b"partial")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert latest_checkpoint(tmp_path).name == "step_00000040.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path)) == {"step": 40}
    # Pruned checkpoints take their digests with them.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".step_00000050.pt.tmp-123",
        "step_00000030.pt",
        "step_00000030.pt.sha256",
        "step_00000040.pt",
        "step_00000040.pt.sha256",
    ]


def test_no_checkpoint_in_missing_folder(tmp_path):
    assert latest_checkpoint(tmp_path / "nope") is None


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path, 1, {"rng": rng_state()}, keep=1)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(load_checkpoint(latest_checkpoint(tmp_path))["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
