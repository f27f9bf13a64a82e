"""Cost of caching every ``blocks.*.hook_resid_post`` site, as a ratio to a bare Hugging Face forward.

A CPU Qwen3 of realistic proportions (8 layers, d_model 512, 8 heads, 4 kv heads, head_dim 64, MLP 1536;
random weights, fp32, eval, no_grad), batch 4 x 128 tokens. Measured in the same run, in rounds that
visit every contender once in a shuffled order (so load drift hits all alike); each figure is the median
over rounds after warm-up, of wall-clock time and of this process's CPU time (the steadier figure on a
shared machine):

- bare forward: ``model(input_ids)``;
- omnilens local: ``lens.run_with_cache(ids, names="blocks.*.hook_resid_post")`` (PyTorch hooks);
- omnilens nnsight: the same through the nnsight executor;
- TransformerLens 3.9 ``TransformerBridge.run_with_cache`` (booted hub-free from a ``save_pretrained`` folder);
- plain nnsight: a hand-written trace saving each decoder layer's output;
- torch-hooks floor (not an anchor): one bare ``register_forward_hook`` per layer that only keeps the output —
  the least any cache can cost, since kept activations cannot be reused by the allocator.

Each contender wraps its own copy of the model (nnsight installs controllers on the modules it wraps,
TransformerLens loads its own), so the bare forward and omnilens local run on an untouched model.

    python benchmarks/bench_cache.py [--rounds 15] [--warmup 2] [--threads 1]

One torch thread by default: on a shared machine, OpenMP workers spin-waiting for a busy core make
multi-threaded timings swing by several times; ``--threads 0`` keeps torch's own choice.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
from collections.abc import Callable

import torch

import omnilens
from _common import add_threads_option, clock, set_threads
from omnilens.testing import tiny_qwen3, tiny_tokenizer

LAYERS, D_MODEL, HEADS, KV_HEADS, D_HEAD, D_MLP = 8, 512, 8, 4, 64, 1536
BATCH, SEQ = 4, 128
PATTERN = "blocks.*.hook_resid_post"


def build_model() -> torch.nn.Module:
    """A random Qwen3 of the benchmark's proportions (vocabulary of the tiny tokenizer)."""
    return tiny_qwen3(
        seed=0, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=D_HEAD, max_position_embeddings=512,
    )


def contenders(model: torch.nn.Module, ids: torch.Tensor, folder: str) -> dict[str, Callable[[], object]]:
    """name -> a zero-argument callable running that contender once (results checked once before timing)."""
    import nnsight
    from nnsight import NNsight
    from transformer_lens.model_bridge import TransformerBridge

    tok = tiny_tokenizer()
    lens_local = omnilens.load(model, tokenizer=tok)
    lens_nn = omnilens.load(copy.deepcopy(model), tokenizer=tok, executor="nnsight")
    bridge = TransformerBridge.boot_transformers(folder, device="cpu", tokenizer=tok)
    plain = NNsight(copy.deepcopy(model))
    layers = plain.model.layers

    def plain_nnsight():
        with plain.trace(input_ids=ids):
            saved = nnsight.save([layers[i].output for i in range(LAYERS)])
        return saved

    kept: list[torch.Tensor] = []

    def torch_hooks_floor():
        kept.clear()
        handles = [layer.register_forward_hook(lambda mod, args, out: kept.append(out)) for layer in model.model.layers]
        try:
            model(input_ids=ids)
        finally:
            for h in handles:
                h.remove()
        return list(kept)

    fns = {
        "bare HF forward": lambda: model(input_ids=ids),
        "torch-hooks floor": torch_hooks_floor,
        "omnilens local": lambda: lens_local.run_with_cache(ids, names=PATTERN),
        "omnilens nnsight": lambda: lens_nn.run_with_cache(ids, names=PATTERN),
        "TransformerLens bridge": lambda: bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post")),
        "plain nnsight": plain_nnsight,
    }
    _check(fns, lens_local)
    return fns


def _check(fns: dict[str, Callable[[], object]], lens) -> None:
    """Every contender caches the same residual streams (fp32, 1e-4: TransformerLens runs its own copy)."""
    with torch.no_grad():
        _, ref = fns["omnilens local"]()
        _, ours = fns["omnilens nnsight"]()
        _, tl = fns["TransformerLens bridge"]()
        plain = fns["plain nnsight"]()
        floor = fns["torch-hooks floor"]()
    for i, name in enumerate(lens.graph.names(PATTERN)):
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0)
        torch.testing.assert_close(floor[i], ref[name], rtol=0, atol=0)
        torch.testing.assert_close(tl[name], ref[name], rtol=0, atol=1e-4)
        torch.testing.assert_close(plain[i], ref[name], rtol=0, atol=0)


def measure(fns: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per contender over ``rounds`` rounds; each round visits every contender
    once, in a shuffled order (seeded), so neither drift nor position in the round favours one."""
    order = list(fns)
    rng = random.Random(0)
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for r in range(warmup + rounds):
            rng.shuffle(order)
            for name in order:
                _, w, c = clock(fns[name])
                if r >= warmup:
                    wall[name].append(w)
                    cpu[name].append(c)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    add_threads_option(parser)
    args = parser.parse_args()
    set_threads(args)
    model = build_model()
    ids = torch.randint(10, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        fns = contenders(model, ids, folder)
    medians = measure(fns, args.rounds, args.warmup)
    bare_wall, bare_cpu = medians["bare HF forward"]
    print(f"Qwen3 {LAYERS} layers, d_model {D_MODEL}, {HEADS} heads ({KV_HEADS} kv), batch {BATCH} x {SEQ} tokens, "
          f"{torch.get_num_threads()} torch threads; caching {PATTERN} ({LAYERS} sites); "
          f"median of {args.rounds} rounds after {args.warmup} warm-up")
    print(f"{'contender':<24} {'wall ms':>9} {'x bare':>8} {'cpu ms':>9} {'x bare':>8}")
    for name, (w, c) in medians.items():
        print(f"{name:<24} {w * 1e3:>9.1f} {w / bare_wall:>8.3f} {c * 1e3:>9.1f} {c / bare_cpu:>8.3f}")
    anchors = [n for n in medians if n not in ("bare HF forward", "omnilens local", "torch-hooks floor")]
    for clock, k in (("wall", 0), ("cpu", 1)):
        local = medians["omnilens local"][k]
        target = local / medians["bare HF forward"][k] <= 1.10
        slower = [n for n in anchors if local > medians[n][k]]
        over_floor = local / medians["torch-hooks floor"][k]
        print(f"[{clock}] omnilens local <= 1.10x bare: {'met' if target else 'MISSED'}; "
              f"not slower than any anchor: {'met' if not slower else 'slower than ' + ', '.join(slower)}; "
              f"{over_floor:.3f}x the torch-hooks floor")

if __name__ == "__main__":
    main()
