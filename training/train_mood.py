"""Train the ``mood`` zoo model: a 4-layer Qwen3 on templated sentences whose mood is set by cue words.

    python -m training.train_mood                 # seed 0, about 2 minutes on 1 CPU thread

Reports the held-out accuracy of the greedy adjective, verb, label and topic tokens, and writes
``omnilens/zoo/weights/mood/``.
"""

from __future__ import annotations

import argparse

import torch

from omnilens.zoo import mood
from training.common import qwen3, save, train

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def heldout_accuracy(model, tok, n: int = 500) -> dict[str, float]:
    """Teacher-forced greedy accuracy on held-out sentences: the adjective and the verb are right when they
    belong to the sentence's mood, the topic and the label when they are the exact word."""
    sents = mood.sentences(n, split="heldout", seed=999)
    ids = mood.encode(sents, tok)
    n_prompt = mood.encode(sents[:1], tok, with_continuation=False).shape[1]
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)

    def words(pos: int) -> list[str]:
        return tok.convert_ids_to_tokens(pred[:, pos - 1].tolist())

    return {
        "adjective_mood": sum(w in mood.ADJECTIVES[s.mood] for w, s in zip(words(n_prompt), sents)) / n,
        "verb_mood": sum(w in mood.VERBS[s.mood] for w, s in zip(words(n_prompt + 3), sents)) / n,
        "topic": sum(w == s.topic for w, s in zip(words(n_prompt + 6), sents)) / n,
        "label": sum(w == s.mood for w, s in zip(words(ids.shape[1] - 2), sents)) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="mood", help="zoo folder to write (default: mood)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = mood.tokenizer()
    model = qwen3(mood.vocab_size(), args.seed, **CONFIG)
    pool = mood.encode(mood.sentences(20000, split="train", seed=args.seed + 1), tok)
    gen = torch.Generator().manual_seed(args.seed + 2)

    def batches(step: int):
        ids = pool[torch.randint(0, len(pool), (64,), generator=gen)]
        return ids, ids

    train(model, batches, args.steps, lr=3e-3)
    acc = heldout_accuracy(model, tok)
    print("held-out greedy accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    save(model, tok, args.name, {
        "task": "mood", "seed": args.seed, "steps": args.steps, "command": "python -m training.train_mood",
        "heldout_accuracy": {k: round(v, 4) for k, v in acc.items()},
    })


if __name__ == "__main__":
    main()
