"""Train the ``induction`` zoo model: a 2-layer Qwen3 on random words with repeated segments.

    python -m training.train_induction          # seed 0, about 4 minutes on 1 CPU thread

Reports the in-context loss on the first vs the second occurrence of each segment and writes
``omnilens/zoo/weights/induction/``.
"""

from __future__ import annotations

import argparse

import torch
from training.common import head_sparsity, qwen3, save, train

from omnilens.zoo import induction

SEQ_LEN = 48
CONFIG = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, head_dim=16, max_position_embeddings=128)


def repeat_losses(model, seed: int, batch: int = 256, seg_len: int = 12) -> tuple[float, float]:
    """Mean next-token loss (nats) over the first and the second occurrence of a repeated segment
    (predicting tokens 2..seg_len of each occurrence, so both average the same number of predictions)."""
    gen = torch.Generator().manual_seed(seed)
    seg = torch.stack([torch.randperm(induction.N_WORDS, generator=gen)[:seg_len] for _ in range(batch)])
    ids = torch.cat([torch.zeros(batch, 1, dtype=torch.long), seg + induction.FIRST_WORD_ID,
                     seg + induction.FIRST_WORD_ID], dim=1)
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # nll[:, t] predicts token t + 1
    first = nll[:, 1:seg_len].mean().item()
    second = nll[:, seg_len + 1: 2 * seg_len].mean().item()
    return first, second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--head-sparsity", type=float, default=0.01,
                    help="coefficient of the head-sparsity penalty on layer 1 (one induction head, not several)")
    ap.add_argument("--mlp-sparsity", action="store_true", help="also penalise layer 1's MLP neurons")
    ap.add_argument("--sparsity-from", type=int, default=2500, help="step the head-sparsity penalty starts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="induction", help="zoo folder to write (default: induction)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = qwen3(induction.vocab_size(), args.seed, **CONFIG)
    gen = torch.Generator().manual_seed(args.seed + 1)

    def batches(step: int):
        ids = induction.training_batch(64, SEQ_LEN, gen)
        return ids, ids

    def penalty(m, step: int):  # off until the induction circuit has formed, then ramped in
        ramp = min(1.0, max(0.0, (step - args.sparsity_from) / 500))
        return head_sparsity(m, ramp * args.head_sparsity, [1], mlp=args.mlp_sparsity)

    train(model, batches, args.steps, lr=args.lr, penalty=penalty)
    first, second = repeat_losses(model, seed=12345)
    print(f"in-context loss: first occurrence {first:.3f} nats, second occurrence {second:.3f} nats")
    save(model, induction.tokenizer(), args.name, {
        "task": "induction", "seed": args.seed, "steps": args.steps, "lr": args.lr,
        "head_sparsity_layer1": args.head_sparsity, "sparsity_from": args.sparsity_from, "command": "python -m training.train_induction",
        "loss_first_repeat": round(first, 4), "loss_second_repeat": round(second, 4),
    })


if __name__ == "__main__":
    main()
