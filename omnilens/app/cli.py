"""The ``omnilens`` console script.

    omnilens patch                      # the main job: patching heatmaps of the embedded induction model
    omnilens patch --model PATH --sweep resid,heads,heads-pos --metric log_prob --out results/
    omnilens patch --plotlyjs directory    # the HTML files share one plotly.min.js instead of 4.7 MB each
    omnilens zoo                        # list the embedded models

``patch`` builds clean/corrupted repeated random sequences (the clean prompt's last token occurred
before; the corrupted prompt replaces that earlier occurrence; the ``mood`` zoo model gets happy prompts
against sad twins), runs exact and attribution patching over the chosen sweeps, ranks heads by direct
logit attribution, writes every heatmap as HTML (PNG when kaleido is installed) and the results as
``.safetensors``, and prints the top components with their scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SWEEPS = {  # name -> (site leaf, sweep axes)
    "resid": ("hook_resid_pre", ("layer", "pos")),
    "resid_mid": ("hook_resid_mid", ("layer", "pos")),
    "resid_post": ("hook_resid_post", ("layer", "pos")),
    "attn_out": ("hook_attn_out", ("layer", "pos")),
    "mlp_out": ("hook_mlp_out", ("layer", "pos")),
    "heads": ("hook_z", ("layer", "head")),
    "heads-pos": ("hook_z", ("layer", "head", "pos")),
    "q": ("hook_q", ("layer", "head")),
    "k": ("hook_k", ("layer", "head")),
    "v": ("hook_v", ("layer", "head")),
    "pattern": ("hook_pattern", ("layer", "head")),
}
METRICS = ("logit_diff", "log_prob", "prob", "kl")
METHODS = ("exact", "atp", "both")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``omnilens`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, KeyError, IndexError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"omnilens {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnilens", description="omnilens: interpretability for Qwen models.")
    sub = p.add_subparsers(dest="command")
    pp = sub.add_parser("patch", help="activation + attribution patching heatmaps (default: the induction zoo model)",
                        description=__doc__.split("\n\n")[2].replace("\n", " "))
    pp.add_argument("--model", default="induction",
                    help="a zoo model name (see `omnilens zoo`) or any omnilens.load-able folder (default: induction)")
    pp.add_argument("--task", default="auto", choices=("auto", "induction", "mood"),
                    help="clean/corrupted prompts: induction (repeated random sequences) or mood (happy vs sad cue "
                         "words; needs the mood vocabulary); auto: the zoo model's own task, else induction")
    pp.add_argument("--sweep", default="resid,heads",
                    help=f"comma-separated sweeps: {', '.join(SWEEPS)} (default: resid,heads)")
    pp.add_argument("--metric", default="logit_diff", choices=METRICS,
                    help="logit_diff (answer - wrong token), log_prob / prob of the answer, kl (to clean) at the last "
                         "position (default: logit_diff)")
    pp.add_argument("--method", default="both", choices=METHODS, help="exact, atp or both (default: both)")
    pp.add_argument("--direction", default="denoise", choices=("denoise", "noise"),
                    help="denoise: patch clean into corrupted; noise: corrupted into clean (default: denoise)")
    pp.add_argument("--out", default="omnilens_out", help="output folder (default: ./omnilens_out)")
    pp.add_argument("--batch", type=int, default=16, help="prompt pairs (default: 16)")
    pp.add_argument("--seg-len", type=int, default=10, help="length of the repeated segment (default: 10)")
    pp.add_argument("--seed", type=int, default=0, help="seed of the random sequences (default: 0)")
    pp.add_argument("--top", type=int, default=5, help="components printed per result (default: 5)")
    pp.add_argument("--plotlyjs", default="inline", choices=("inline", "directory"),
                    help="inline: each HTML file carries plotly.js (about 4.7 MB, stands alone); directory: one "
                         "plotly.min.js in the output folder, shared by its HTML files (default: inline)")
    pp.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    pp.set_defaults(run=_patch)
    zp = sub.add_parser("zoo", help="list the embedded zoo models")
    zp.set_defaults(run=_zoo)
    return p


# commands ---------------------------------------------------------------------------------------
def _zoo(args: argparse.Namespace) -> int:
    import omnilens.zoo as zoo

    for name in zoo.names():
        card = zoo.card(name)
        print(f"{name:12s} {card.get('task', '')}  seed {card.get('seed')}  ({card.get('command', '')})")
    return 0


def _patch(args: argparse.Namespace) -> int:
    from omnilens.methods.patching import patch_attribution, patch_exact, rank_correlation
    from omnilens.viz import png_available, save

    sweeps = _sweeps(args.sweep)
    t0 = time.time()
    lens, label = _load(args.model)
    task, pairs, about = _task(lens, args)
    metric = _metric(args.metric, pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"model      {label}  ({lens.config.num_hidden_layers} layers, {lens.config.num_attention_heads} heads)")
    print(f"task       {task}: {about}")
    print(f"example    clean     {_text(lens, pairs.clean[0])}")
    print(f"           corrupted {_text(lens, pairs.corrupted[0])}")
    print(f"metric     {args.metric} at the last position; {args.direction}; 0 = corrupted, 1 = clean")

    plotlyjs = True if args.plotlyjs == "inline" else args.plotlyjs
    methods = ["exact", "atp"] if args.method == "both" else [args.method]
    jobs = [(m, name, sw) for name, sw in sweeps for m in methods]
    results: dict[tuple[str, str], Any] = {}
    for method, name, sweep in _progress(jobs, args.no_progress, "patching"):
        extra = {"progress": not args.no_progress} if method == "exact" else {}
        fn = patch_exact if method == "exact" else patch_attribution
        results[method, name] = fn(lens, pairs.clean, pairs.corrupted, metric, sweep, direction=args.direction,
                                   **extra)
    first = next(iter(results.values()))
    print(f"\nmetric on clean {first.clean:.4f}, on corrupted {first.corrupted:.4f}")

    written: list[Path] = []
    summary: dict[str, Any] = {"model": label, "task": task, "metric": args.metric, "direction": args.direction,
                               "clean": first.clean, "corrupted": first.corrupted, "results": {}}
    for (method, name), res in results.items():
        print(f"\n{method:5s} {name:9s} top {args.top}:")
        top = _top(res, args.top)
        for labels, value in top:
            print(f"    {_component(labels):28s} {value:+.3f}")
        stem = out / f"{method}_{name}"
        written += save(res.to_figure(), stem, include_plotlyjs=plotlyjs)
        written.append(res.save(stem.with_suffix(".safetensors")))
        summary["results"][f"{method}_{name}"] = [{"component": _component(lab), "score": v} for lab, v in top]
    if args.method == "both":
        print()
        for name, _ in sweeps:
            rho = rank_correlation(results["exact", name].values, results["atp", name].values)
            summary["results"][f"agreement_{name}"] = rho
            print(f"exact vs AtP rank correlation, {name:9s} {rho:+.3f}")
    if args.metric == "logit_diff":
        written += _dla(lens, pairs, out, args.top, summary, plotlyjs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    written.append(out / "summary.json")
    print(f"\nwrote {len(written)} files to {out}/ in {time.time() - t0:.1f}s"
          + ("" if png_available() else " (HTML only: install kaleido for PNG)"))
    for path in written:
        print(f"    {path.name}")
    return 0


# pieces -----------------------------------------------------------------------------------------
def _load(model: str):
    """A lens over zoo model ``model``, or over the folder ``model``; unknown names list the zoo."""
    import omnilens.zoo as zoo
    from omnilens.lens import load

    from transformers.utils import logging

    logging.disable_progress_bar()
    if model in zoo.names():
        return zoo.load(model), f"zoo:{model}"
    if Path(model).is_dir():
        return load(model), model
    raise ValueError(f"unknown model {model!r}: not a zoo model and not a folder; "
                     f"zoo models: {', '.join(zoo.names())}")


def _sweeps(spec: str):
    from omnilens.methods.patching import Sweep

    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in SWEEPS]
    if bad or not names:
        raise ValueError(f"unknown sweep(s) {bad or spec!r}; choose from {', '.join(SWEEPS)}")
    return [(n, Sweep(SWEEPS[n][0], by=SWEEPS[n][1])) for n in dict.fromkeys(names)]


def _task(lens, args):
    """``(task, pairs, description)``: the clean/corrupted prompts of ``args.task`` for ``lens``."""
    import omnilens.zoo as zoo
    from omnilens.zoo import mood
    from omnilens.zoo.induction import induction_pairs

    task = args.task
    if task == "auto":
        task = zoo.card(args.model)["task"] if args.model in zoo.names() else "induction"
    if task == "mood":
        return task, mood.contrast_pairs(lens.tokenizer, args.batch, seed=args.seed), (
            f"{args.batch} happy prompts; corrupted: their cue words swapped for sad ones; answer: "
            f"{mood.ADJECTIVES['happy'][0]!r} vs {mood.ADJECTIVES['sad'][0]!r}")
    tok = lens.tokenizer
    n_vocab = lens.config.get_text_config().vocab_size
    special = set(getattr(tok, "all_special_ids", []) or [])
    vocab = torch.tensor([i for i in range(min(n_vocab, len(tok) if tok is not None else n_vocab)) if i not in special])
    pairs = induction_pairs(args.batch, args.seg_len, seed=args.seed, vocab=vocab, bos=getattr(tok, "bos_token_id", None))
    return task, pairs, (f"{args.batch} repeated random sequences, segment {args.seg_len}; corrupted: the last "
                         f"token's earlier occurrence replaced; answer: the token after it vs the replacing token")


def _metric(name: str, pairs):
    from omnilens.methods.patching import KLToClean, LogitDiff, LogProb, Prob

    return {"logit_diff": lambda: LogitDiff(pairs.answer, pairs.wrong), "log_prob": lambda: LogProb(pairs.answer),
            "prob": lambda: Prob(pairs.answer), "kl": lambda: KLToClean()}[name]()


def _dla(lens, pairs, out: Path, k: int, summary: dict, plotlyjs: bool | str) -> list[Path]:
    """Rank heads by direct logit attribution (answer - wrong token) on the clean prompts; save its heatmap."""
    from omnilens.methods.heads import direct_logit_attribution
    from omnilens.viz import save

    scores = direct_logit_attribution(lens, pairs.clean, pairs.answer, pairs.wrong)
    print(f"\ndirect logit attribution (clean, answer - wrong token), top {k}:")
    top = scores.top(k)
    for layer, head, value in top:
        print(f"    {_component({'layer': str(layer), 'head': str(head)}):28s} {value:+.3f}")
    summary["results"]["dla_heads"] = [{"component": f"L{l}.H{h}", "score": v} for l, h, v in top]
    return save(scores.figure(), out / "dla_heads.html", include_plotlyjs=plotlyjs)


def _top(res, k: int) -> list[tuple[dict[str, str], float]]:
    """The ``k`` components that matter most: largest ``|value|`` when denoising (0 = corrupted), largest
    ``|1 - value|`` when noising (1 = clean: an unimportant component leaves the clean run unchanged)."""
    return res.top(k, reference=0.0 if res.direction == "denoise" else 1.0)


def _component(labels: dict[str, str]) -> str:
    """``L1.H3``, ``L0 pos 11:cat``, ``L1.H3 pos 5:dog`` from a result's labels."""
    name = f"L{labels['layer']}"
    for axis in ("head", "kv_head"):
        if axis in labels:
            name += f".{'H' if axis == 'head' else 'KV'}{labels[axis]}"
    for axis in ("pos", "query", "span"):
        if axis in labels:
            name += f" {axis} {labels[axis]}"
    return name


def _text(lens, ids: torch.Tensor) -> str:
    return " ".join(lens.to_str_tokens(ids))


def _progress(items: list, disable: bool, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(items, desc=desc, disable=disable, unit="sweep", file=sys.stderr)
    for item in bar:
        bar.set_postfix_str(f"{item[0]} {item[1]}")
        yield item


if __name__ == "__main__":
    sys.exit(main())
