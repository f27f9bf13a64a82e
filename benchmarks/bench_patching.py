"""Activation patching heatmaps: omnilens exact-batched and AtP against TransformerLens `patching` and a
plain nnsight loop, in the same run, on the same random-weight Qwen3 (8 layers, 16 heads, seq 64).

Two heatmaps: resid_pre (layer x position) and head output (layer x head, all positions). The exact
results of omnilens, TransformerLens and nnsight are asserted equal. Prints wall times and the ratios
against the anchors measured here (targets: exact-batched >= 5x faster than TransformerLens; AtP >= 50x
faster than TransformerLens exact).

    python benchmarks/bench_patching.py [--d-model 256] [--seq 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's per-cell progress bars

import torch  # noqa: E402
import transformer_lens.patching as tlp  # noqa: E402
from nnsight import NNsight  # noqa: E402
from transformer_lens import HookedTransformer, loading  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

import omnilens  # noqa: E402
from _common import add_threads_option, clock, set_threads  # noqa: E402
from omnilens.patching import LogitDiff, Sweep, patch_attribution, patch_exact, rank_correlation  # noqa: E402
from omnilens.testing import tiny_tokenizer  # noqa: E402

TOL = 1e-4


def build(d_model: int, n_layers: int, n_heads: int, vocab: int, seed: int = 0) -> Qwen3ForCausalLM:
    """A random Qwen3 of realistic proportions: d_head = d_model / heads, half as many kv heads, MLP 3x."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=d_model, intermediate_size=3 * d_model,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads // 2,
                      head_dim=d_model // n_heads, max_position_embeddings=512, tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg).eval()


def boot_tl(model: Qwen3ForCausalLM) -> HookedTransformer:
    """A HookedTransformer on the same weights, booted from a ``save_pretrained`` folder (no hub)."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        cfg = loading.get_pretrained_model_config(folder, device="cpu")
        state = loading.get_pretrained_state_dict(folder, cfg, model)
    tl = HookedTransformer(cfg, tiny_tokenizer())  # any tokenizer: the benchmark feeds token ids
    tl.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False)
    return tl.eval()


def nnsight_loop(model, clean: torch.Tensor, corrupted: torch.Tensor, metric) -> tuple[torch.Tensor, torch.Tensor]:
    """One nnsight trace per cell: resid_pre [layer pos] and head output [layer head] (o_proj input slices)."""
    nm = NNsight(model)
    n_layers, d_head = model.config.num_hidden_layers, model.config.head_dim
    n_heads, seq = model.config.num_attention_heads, clean.shape[1]
    saved = []
    with torch.no_grad(), nm.trace(clean):
        for layer in range(n_layers):
            saved.append((nm.model.layers[layer].input.save(), nm.model.layers[layer].self_attn.o_proj.input.save()))
    resid = torch.empty(n_layers, seq)
    heads = torch.empty(n_layers, n_heads)
    for layer in range(n_layers):
        for pos in range(seq):
            with torch.no_grad(), nm.trace(corrupted):
                h = nm.model.layers[layer].input
                h[:, pos] = saved[layer][0][:, pos]
                logits = nm.output.logits.save()
            resid[layer, pos] = metric(logits).mean()
        for head in range(n_heads):
            with torch.no_grad(), nm.trace(corrupted):
                z = nm.model.layers[layer].self_attn.o_proj.input
                z[:, :, head * d_head:(head + 1) * d_head] = saved[layer][1][:, :, head * d_head:(head + 1) * d_head]
                logits = nm.output.logits.save()
            heads[layer, head] = metric(logits).mean()
    return resid, heads


CPU: dict[str, float] = {}


def timed(fn, name: str):
    """``(fn(), wall seconds)``; the process CPU seconds go to ``CPU[name]`` (steadier on a shared machine)."""
    out, wall, CPU[name] = clock(fn)
    return out, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    add_threads_option(ap)
    args = ap.parse_args()
    set_threads(args)

    model = build(args.d_model, args.layers, args.heads, args.vocab)
    lens = omnilens.load(model)
    tl = boot_tl(model)
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, args.vocab, (1, args.seq), generator=gen)
    corrupted = clean.clone()
    swap = torch.randperm(args.seq, generator=gen)[:4]
    corrupted[0, swap] = torch.randint(0, args.vocab, (4,), generator=gen)
    with torch.no_grad():
        top = model(clean).logits[0, -1].topk(2).indices.tolist()
        assert (tl(clean) - model(clean).logits).abs().max() < TOL, "TransformerLens model differs"
    metric = LogitDiff(top[0], top[1])
    tl_metric = lambda logits: metric(logits).mean()  # noqa: E731
    resid_sw, head_sw = Sweep("hook_resid_pre"), Sweep("hook_z", by=("layer", "head"))
    print(f"model: Qwen3 {args.layers} layers, d_model {args.d_model}, {args.heads} heads "
          f"({args.heads // 2} kv), vocab {args.vocab}, seq {args.seq}; torch threads {torch.get_num_threads()}")

    patch_exact(lens, clean, corrupted, metric, Sweep("hook_z", by=("layer", "head"), layers=[-1]))  # warm-up
    om_resid, t_om_resid = timed(lambda: patch_exact(lens, clean, corrupted, metric, resid_sw), "om_resid")
    om_head, t_om_head = timed(lambda: patch_exact(lens, clean, corrupted, metric, head_sw), "om_head")
    atp, t_atp = timed(lambda: patch_attribution(lens, clean, corrupted, metric, [resid_sw, head_sw]), "atp")
    _, t_atp_resid = timed(lambda: patch_attribution(lens, clean, corrupted, metric, resid_sw), "atp_resid")
    _, t_atp_head = timed(lambda: patch_attribution(lens, clean, corrupted, metric, head_sw), "atp_head")

    def tl_run(fn):
        with torch.no_grad():
            _, cache = tl.run_with_cache(clean)
            return fn(tl, corrupted, cache, tl_metric)

    tl_resid, t_tl_resid = timed(lambda: tl_run(tlp.get_act_patch_resid_pre), "tl_resid")
    tl_head, t_tl_head = timed(lambda: tl_run(tlp.get_act_patch_attn_head_out_all_pos), "tl_head")
    (nn_resid, nn_head), t_nn = timed(lambda: nnsight_loop(model, clean, corrupted, metric), "nn")

    errs = {
        "omnilens vs TransformerLens, resid_pre": (om_resid.raw - tl_resid).abs().max().item(),
        "omnilens vs TransformerLens, heads": (om_head.raw - tl_head).abs().max().item(),
        "omnilens vs nnsight loop, resid_pre": (om_resid.raw - nn_resid).abs().max().item(),
        "omnilens vs nnsight loop, heads": (om_head.raw - nn_head).abs().max().item(),
    }
    for name, err in errs.items():
        print(f"  max |diff| {name}: {err:.2e}")
        assert err <= TOL, f"{name}: exact results differ by {err:.2e} > {TOL}"
    assert om_resid.raw.std() > 1e-3, "flat heatmap: the comparison would be vacuous"

    n_resid, n_head = om_resid.raw.numel(), om_head.raw.numel()
    rows = [
        ("TransformerLens patching", t_tl_resid, t_tl_head),
        ("nnsight loop (one trace per cell)", None, None),
        ("omnilens exact, batched", t_om_resid, t_om_head),
        ("omnilens AtP (per sweep)", t_atp_resid, t_atp_head),
    ]
    print(f"\n{'method':<36}{'resid_pre (' + str(n_resid) + ' cells)':>22}{'heads (' + str(n_head) + ' cells)':>20}"
          f"{'total':>10}")
    for name, a, b in rows:
        if a is None:
            print(f"{name:<36}{'':>22}{'':>20}{t_nn:>9.2f}s")
        else:
            print(f"{name:<36}{a:>21.2f}s{b:>19.2f}s{a + b:>9.2f}s")
    print(f"{'omnilens AtP (both sweeps, one pass)':<36}{'':>22}{'':>20}{t_atp:>9.2f}s")
    t_tl = t_tl_resid + t_tl_head
    print("\nratios (higher = omnilens faster):")
    print(f"  exact-batched vs TransformerLens : resid_pre {t_tl_resid / t_om_resid:6.1f}x   heads "
          f"{t_tl_head / t_om_head:6.1f}x   total {t_tl / (t_om_resid + t_om_head):6.1f}x   (target >= 5x)")
    print(f"  exact-batched vs nnsight loop    : total {t_nn / (t_om_resid + t_om_head):6.1f}x")
    print(f"  AtP vs TransformerLens exact     : resid_pre {t_tl_resid / t_atp_resid:6.1f}x   heads "
          f"{t_tl_head / t_atp_head:6.1f}x   both sweeps in one pass {t_tl / t_atp:6.1f}x   (target >= 50x)")
    c_tl, c_om = CPU["tl_resid"] + CPU["tl_head"], CPU["om_resid"] + CPU["om_head"]
    print(f"  by process CPU time              : exact-batched vs TransformerLens {c_tl / c_om:6.1f}x, "
          f"vs nnsight loop {CPU['nn'] / c_om:6.1f}x; AtP (one pass) vs TransformerLens exact "
          f"{c_tl / CPU['atp']:6.1f}x")
    print(f"  AtP agreement with exact (Spearman): resid_pre {rank_correlation(atp[0].values, om_resid.values):+.3f}, "
          f"heads {rank_correlation(atp[1].values, om_head.values):+.3f}")


if __name__ == "__main__":
    main()
