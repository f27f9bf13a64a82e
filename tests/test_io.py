"""Atomic writes: readers never see a partial file, failures leave the old file, permissions are normal."""

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from omnilens.io import atomic_save_safetensors, atomic_write, atomic_write_json, atomic_write_text


def test_permissions_match_a_plain_write(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(atomic).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = atomic_write_json(tmp_path / "m.json", {"a": 1})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("{partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == '{\n "a": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_safetensors_round_trip_with_metadata(tmp_path):
    t = {"layer_0.vectors": torch.arange(6, dtype=torch.float16).reshape(2, 3)}
    path = atomic_save_safetensors(tmp_path / "r.safetensors", t, {"k": "v"})
    back = load_file(path)
    assert torch.equal(back["layer_0.vectors"], t["layer_0.vectors"])
