"""Train the ``induction`` zoo model: a 2-layer attention-only Qwen3 on repeated segments and bigram walks.

    python -m training.train_induction          # seed 0, about 4 minutes on 1 CPU thread

Reports the in-context loss on the first vs the second occurrence of each segment and writes
``omnilens/zoo/weights/induction/``.
"""

from __future__ import annotations

import argparse

import torch

from omnilens.zoo import induction
from training.common import head_sparsity, qwen3, save, train

SEQ_LEN = 48
CONFIG = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, head_dim=16, max_position_embeddings=128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--head-sparsity", type=float, default=0.1,
                    help="coefficient of the head-sparsity penalty on layer 1 (one induction head, not several)")
    ap.add_argument("--keep-mlp", action="store_true", help="train the MLPs (default: zeroed and frozen)")
    ap.add_argument("--sparsity-from", type=int, default=2500, help="step the head-sparsity penalty starts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="induction", help="zoo folder to write (default: induction)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = qwen3(induction.vocab_size(), args.seed, **CONFIG)
    if not args.keep_mlp:  # attention-only, as in Olsson et al.: Qwen3 blocks always have an MLP, so zero and freeze it
        for layer in model.model.layers:
            for p in layer.mlp.parameters():
                p.requires_grad_(False)
                p.zero_()
    gen = torch.Generator().manual_seed(args.seed + 1)

    def batches(step: int):
        ids = induction.training_batch(64, SEQ_LEN, gen)
        return ids, ids

    def penalty(m, step: int):  # off until the induction circuit has formed, then ramped in
        ramp = min(1.0, max(0.0, (step - args.sparsity_from) / 500))
        return head_sparsity(m, ramp * args.head_sparsity, [1], mlp=False)

    train(model, batches, args.steps, lr=args.lr, penalty=penalty)
    first, second = induction.repeat_losses(model, seed=12345)
    print(f"in-context loss: first occurrence {first:.3f} nats, second occurrence {second:.3f} nats")
    save(model, induction.tokenizer(), args.name, {
        "task": "induction", "seed": args.seed, "steps": args.steps, "lr": args.lr,
        "head_sparsity_layer1": args.head_sparsity, "sparsity_from": args.sparsity_from,
        "attention_only": not args.keep_mlp, "command": "python -m training.train_induction",
        "loss_first_repeat": round(first, 4), "loss_second_repeat": round(second, 4),
    })


if __name__ == "__main__":
    main()
