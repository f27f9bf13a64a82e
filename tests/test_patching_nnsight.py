"""The nnsight executor gives the same heatmaps as the local one, and batched patching runs through
nnsight's remote-simulation round trip (the trace serialised as for a remote backend)."""

from __future__ import annotations

import pytest
from conftest import make_model

import omnilens
from omnilens.patching import LogitDiff, Sweep, patch_exact

TOL = 1e-5
CLEAN = ["the cat is happy and sad", "a red bird is in the"]
CORRUPT = ["the dog is sad and happy", "a blue fish is in the"]
SWEEPS = [Sweep("hook_resid_pre"), Sweep("hook_resid_mid"), Sweep("hook_z", by=("layer", "head")),
          Sweep("hook_k", by=("layer", "head", "pos")), Sweep("hook_pattern", by=("layer", "head"))]


@pytest.fixture(scope="module")
def lens(tokenizer):
    return omnilens.load(make_model("dense"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def metric(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    return LogitDiff([ids("happy"), ids("house")], [ids("sad"), ids("tree")])


def test_nnsight_heatmaps_equal_local(lens, metric):
    local = patch_exact(lens, CLEAN, CORRUPT, metric, SWEEPS, chunk_size=5)
    nn = patch_exact(lens, CLEAN, CORRUPT, metric, SWEEPS, chunk_size=5, executor="nnsight")
    for a, b in zip(local, nn):
        assert a.axes == b.axes and a.labels == b.labels
        assert (a.raw - b.raw).abs().max() < TOL
        assert a.raw.std() > 1e-3
        assert b.provenance["executor"] == "nnsight"


def test_patching_through_remote_simulation_round_trip(lens, metric):
    remote = lens.executor("nnsight", remote="local")
    sweeps = [Sweep("hook_resid_pre", layers=[1]), Sweep("hook_v", by=("layer", "head"))]
    local = patch_exact(lens, CLEAN, CORRUPT, metric, sweeps)
    sim = patch_exact(lens, CLEAN, CORRUPT, metric, sweeps, executor=remote)
    for a, b in zip(local, sim):
        assert (a.raw - b.raw).abs().max() < TOL and a.raw.std() > 1e-3
    assert sim[0].provenance["executor"] == "NNsightExecutor(remote='local')"
