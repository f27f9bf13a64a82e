"""The nnsight executor gives the same heatmaps as the local one, and batched patching runs through
nnsight's remote-simulation round trip (the trace serialised as for a remote backend)."""

from __future__ import annotations

from conftest import CLEAN_PAIR, CORRUPT_PAIR

from omnilens.patching import Sweep, patch_exact

TOL = 1e-5
SWEEPS = [Sweep("hook_resid_pre"), Sweep("hook_resid_mid"), Sweep("hook_z", by=("layer", "head")),
          Sweep("hook_k", by=("layer", "head", "pos")), Sweep("hook_pattern", by=("layer", "head"))]


def test_nnsight_heatmaps_equal_local(dense_lens, swap_metric):
    local = patch_exact(dense_lens, CLEAN_PAIR, CORRUPT_PAIR, swap_metric, SWEEPS, chunk_size=5)
    nn = patch_exact(dense_lens, CLEAN_PAIR, CORRUPT_PAIR, swap_metric, SWEEPS, chunk_size=5, executor="nnsight")
    for a, b in zip(local, nn):
        assert a.axes == b.axes and a.labels == b.labels
        assert (a.raw - b.raw).abs().max() < TOL
        assert a.raw.std() > 1e-3
        assert b.provenance["executor"] == "nnsight"


def test_patching_through_remote_simulation_round_trip(dense_lens, swap_metric):
    remote = dense_lens.executor("nnsight", remote="local")
    sweeps = [Sweep("hook_resid_pre", layers=[1]), Sweep("hook_v", by=("layer", "head"))]
    local = patch_exact(dense_lens, CLEAN_PAIR, CORRUPT_PAIR, swap_metric, sweeps)
    sim = patch_exact(dense_lens, CLEAN_PAIR, CORRUPT_PAIR, swap_metric, sweeps, executor=remote)
    for a, b in zip(local, sim):
        assert (a.raw - b.raw).abs().max() < TOL and a.raw.std() > 1e-3
    assert sim[0].provenance["executor"] == "NNsightExecutor(remote='local')"
