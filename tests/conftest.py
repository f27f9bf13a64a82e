"""Shared fixtures: tiny seeded Qwen3 models (norm weights randomised so that norm sites are not
trivially ``x / rms``), their lenses, the tiny tokenizer and a right-padded batch; tiny Qwen2-VL and
Qwen3-Omni lenses, their tokenizers and test images / waveforms; hook counting and a strict ``close``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import omnilens
from omnilens.hookpoints import HookPoint
from omnilens.testing import (tiny_omni, tiny_omni_thinker, tiny_omni_tokenizer, tiny_qwen2_vl, tiny_qwen3,
                              tiny_qwen3_moe, tiny_tokenizer)

# Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's spinning workers make
# each forward hundreds of times slower (measured: 2 threads ~0.8 s, 1 thread ~2 ms per tiny forward).
torch.set_num_threads(1)

TEXTS = ["the cat is happy and the dog is sad", "a red bird"]  # 9 and 3 tokens: a padded batch
# a clean / corrupted prompt pair (same lengths); answers "happy"/"house" against "sad"/"tree" (``swap_metric``)
CLEAN_PAIR = ["the cat is happy and sad", "a red bird is in the"]
CORRUPT_PAIR = ["the dog is sad and happy", "a blue fish is in the"]
MODEL_KINDS = ("dense", "moe")


def randomise_norms(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every RMSNorm weight spread around 1 and every bias spread around 0 (they initialise to
    ones and zeros, which would hide a missing weight or bias), in place; returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def make_model(kind: str = "dense", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny Qwen3 (``"dense"``) or Qwen3-MoE (``"moe"``) model with randomised norm weights."""
    factory = {"dense": tiny_qwen3, "moe": tiny_qwen3_moe}[kind]
    return randomise_norms(factory(seed=seed, **overrides))


def randomise_towers(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every 1-d norm parameter (``*norm*``, and the vision / audio towers' ``ln_*`` LayerNorms) spread,
    weights around 1 and biases around 0 (they initialise to ones and zeros), in place; returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_" in name) and p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def picture(h: int, w: int, seed: int) -> np.ndarray:
    """A random ``[h w 3]`` uint8 image."""
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def wave(seconds: float, seed: int) -> np.ndarray:
    """Random 16 kHz float32 audio (amplitude ~0.1) of ``seconds``."""
    return (0.1 * np.random.RandomState(seed).randn(int(16000 * seconds))).astype(np.float32)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    """``a`` and ``b`` have the same shape and differ by at most ``atol`` elementwise."""
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """``norm`` (an RMSNorm module) applied to ``x`` by hand."""
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's RoPE helper: ``[a b] -> [-b a]`` on the last axis."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def fused_moe(x, mlp, norm_topk):
    """A Qwen MoE block by hand: router and unrolled fused experts (no shared expert) on flattened tokens
    ``x`` ``[token d]``; returns ``(router logits, top-k weights, top-k ids, expert output)``."""
    logits = x @ mlp.gate.weight.T
    weights, idx = logits.softmax(-1).topk(mlp.gate.top_k, -1)
    if norm_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gate, up = (x[t] @ mlp.experts.gate_up_proj[e].T).chunk(2)
            out[t] += weights[t, j] * ((F.silu(gate) * up) @ mlp.experts.down_proj[e].T)
    return logits, weights, idx, out


def assert_same_values(got, ref, reads) -> None:
    """Two ``RunResult``s have equal logits and, for every read, the same visits with equal values."""
    assert torch.equal(got.output.logits, ref.output.logits)
    for r in reads:
        assert len(got.values[r.name]) == len(ref.values[r.name]), r.name
        assert all(torch.equal(a, b) for a, b in zip(got.values[r.name], ref.values[r.name])), r.name


@pytest.fixture(scope="module")
def tokenizer():
    """A fresh tiny tokenizer per test module (TransformerLens mutates the tokenizers it is given)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def batch() -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[2 pos]``, the second row right-padded."""
    enc = tiny_tokenizer()(TEXTS, return_tensors="pt", padding=True)
    assert enc["attention_mask"][1].sum() < enc["attention_mask"].shape[1]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="module")
def dense_lens(tokenizer) -> omnilens.Lens:
    """A lens over the tiny dense Qwen3 model (one per test module)."""
    return omnilens.load(make_model("dense"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def moe_lens(tokenizer) -> omnilens.Lens:
    """A lens over the tiny Qwen3-MoE model (one per test module)."""
    return omnilens.load(make_model("moe"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def swap_metric(tokenizer):
    """``LogitDiff`` of ``CLEAN_PAIR``'s answers: "happy" / "house" against "sad" / "tree"."""
    from omnilens.patching import LogitDiff

    ids = tokenizer.convert_tokens_to_ids
    return LogitDiff([ids("happy"), ids("house")], [ids("sad"), ids("tree")])


@pytest.fixture(params=MODEL_KINDS)
def lens(request, tokenizer) -> omnilens.Lens:
    """A fresh lens over a tiny dense or MoE Qwen3 model."""
    return omnilens.load(make_model(request.param), tokenizer=tokenizer)


def hook_counts(model: torch.nn.Module) -> int:
    """Number of forward hooks and pre-hooks left on any module of ``model``."""
    return len(hooks_on(model))


def hooks_on(model: torch.nn.Module) -> set[tuple[str, str, int]]:
    """Every forward hook and pre-hook on ``model``'s modules, as ``(module, kind, handle id)``."""
    return {(name, kind, key) for name, m in model.named_modules()
            for kind, hooks in (("hook", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in hooks}


def assert_clean(model: torch.nn.Module) -> None:
    """Nothing of a run is left on ``model``: no forward hooks or pre-hooks, no hook points, every config back
    on ``sdpa`` attention and no ``"eager"`` attention function registered."""
    assert hook_counts(model) == 0
    assert not any(isinstance(m, HookPoint) for m in model.modules())
    assert all(m.config._attn_implementation == "sdpa" for m in model.modules() if hasattr(m, "config"))
    assert "eager" not in ALL_ATTENTION_FUNCTIONS


@pytest.fixture(scope="module")
def vl_lens(tokenizer) -> omnilens.Lens:
    """A lens over a tiny Qwen2-VL model with randomised norms (one per test module)."""
    return omnilens.load(randomise_towers(tiny_qwen2_vl()), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def omni_tok():
    """The tiny Qwen3-Omni tokenizer (knows the audio / vision special tokens)."""
    return tiny_omni_tokenizer()


@pytest.fixture(scope="module")
def thinker_lens(omni_tok) -> omnilens.Lens:
    """A lens over a tiny Qwen3-Omni Thinker (text MoE, audio and vision towers) with randomised norms."""
    return omnilens.load(randomise_towers(tiny_omni_thinker()), tokenizer=omni_tok)


@pytest.fixture(scope="module")
def omni_lens(omni_tok) -> omnilens.Lens:
    """A lens over a tiny full Qwen3-Omni (Thinker, Talker, code predictor, code2wav) with randomised norms."""
    return omnilens.load(randomise_towers(tiny_omni()), tokenizer=omni_tok)
