"""Shared fixtures: tiny seeded Qwen3 models (norm weights randomised so that norm sites are not
trivially ``x / rms``), their lenses, the tiny tokenizer and a right-padded batch."""

from __future__ import annotations

import pytest
import torch

import omnilens
from omnilens.testing import tiny_qwen3, tiny_qwen3_moe, tiny_tokenizer

# Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's spinning workers make
# each forward hundreds of times slower (measured: 2 threads ~0.8 s, 1 thread ~2 ms per tiny forward).
torch.set_num_threads(1)

TEXTS = ["the cat is happy and the dog is sad", "a red bird"]  # 9 and 3 tokens: a padded batch
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
