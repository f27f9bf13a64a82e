"""Shared pieces of the zoo training scripts: a seeded tiny Qwen3, an AdamW loop, saving to the zoo folder."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

ZOO_WEIGHTS = Path(__file__).resolve().parent.parent / "omnilens" / "zoo" / "weights"


def qwen3(vocab_size: int, seed: int, **cfg) -> Qwen3ForCausalLM:
    """A freshly initialised ``Qwen3ForCausalLM`` (seeded) with bos/pad = 0 and eos = 1."""
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, pad_token_id=0, bos_token_id=0, eos_token_id=1,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, **cfg)
    return Qwen3ForCausalLM(config)


def train(model: Qwen3ForCausalLM, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]], steps: int,
          lr: float, warmup: int = 100, weight_decay: float = 0.01, log_every: int = 100,
          penalty: Callable[[Qwen3ForCausalLM, int], torch.Tensor] | None = None) -> None:
    """AdamW with linear warm-up and cosine decay. ``batches(step)`` returns ``(input_ids, labels)``
    (labels ``-100`` where no loss is taken; shifted inside the model); ``penalty(model, step)`` is added to the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0 = time.time()
    for step in range(steps):
        ids, labels = batches(step)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        (loss + penalty(model, step) if penalty is not None else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    model.eval()


def head_sparsity(model: Qwen3ForCausalLM, coef: float, layers: Sequence[int], mlp: bool = False) -> torch.Tensor:
    """``coef * sum over heads of sqrt(||W_V of the head|| * ||W_O of the head||)`` in ``layers`` (and, with
    ``mlp``, over MLP neurons: ``sqrt(||up row|| * ||down column||)``). The products do not change when a
    head's value and output maps are rescaled against each other, and the square root is concave, so one
    head doing a job costs less than several redundant copies sharing it: the penalty leaves one head per
    role in those layers and switches the others off."""
    cfg = model.config
    total = torch.zeros(())
    for i in layers:
        layer = model.model.layers[i]
        attn = layer.self_attn
        o = attn.o_proj.weight.view(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim).norm(dim=(0, 2))
        v = attn.v_proj.weight.view(cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size).norm(dim=(1, 2))
        v = v.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads)
        total = total + (o * v + 1e-8).sqrt().sum()
        if mlp:
            down, up = layer.mlp.down_proj.weight.norm(dim=0), layer.mlp.up_proj.weight.norm(dim=1)
            total = total + (down * up + 1e-8).sqrt().sum()
    return coef * total


def save(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, name: str, card: dict) -> Path:
    """Write ``model.safetensors``, ``config.json``, the tokenizer and ``zoo.json`` (training facts) to the zoo."""
    out = ZOO_WEIGHTS / name
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "zoo.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"saved {name} to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.2f} MB)")
    return out
