"""Data for the ``induction`` zoo model: repeated random segments and in-context bigram walks, and the
clean/corrupted pairs that patch its induction circuit (Olsson et al. 2022).

Token ids: 0 = bos, 1 = eos (unused), then :data:`WORDS`, then ``[UNK]``. Everything is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from transformers import PreTrainedTokenizerFast

from omnilens.zoo.vocab import word_tokenizer, word_vocab_size

WORDS = (
    "ant bee cat cow dog eel elk fox gnu hen jay koi owl pig ram rat yak ape bat cod "
    "red tan sky sea sun fog ice oak elm ash fir bay cove dune glen hill lake moor peak reef "
    "axe bow cup fan hat jar key map mug net oar pan pen pot rod saw tap urn vat wig "
    "arm ear eye hip jaw leg lip rib toe gum "
    "bun egg fig ham jam nut pea pie rye tea yam oat "
    "box bus cab car jet van cart ship raft sled "
    "one two six ten"
).split()
FIRST_WORD_ID = 2
N_WORDS = len(WORDS)


def tokenizer() -> PreTrainedTokenizerFast:
    """The induction model's word-level tokenizer."""
    return word_tokenizer(WORDS)


def vocab_size() -> int:
    """Size of the induction model's vocabulary (:data:`WORDS` plus bos, eos and ``[UNK]``)."""
    return word_vocab_size(WORDS)


def _words(gen: torch.Generator, n: int, distinct: bool = False) -> torch.Tensor:
    if distinct:
        return torch.randperm(N_WORDS, generator=gen)[:n] + FIRST_WORD_ID
    return torch.randint(0, N_WORDS, (n,), generator=gen) + FIRST_WORD_ID


def repeated_segments(batch: int, seq_len: int, gen: torch.Generator) -> Int[torch.Tensor, "batch seq_len"]:
    """``[batch seq_len]``: bos, a random prefix (0-8 words), a segment of 2-20 distinct words, a random gap
    (0-4 words), the same segment again, then random words up to ``seq_len``."""
    out = _words(gen, batch * seq_len).view(batch, seq_len)
    out[:, 0] = 0
    for row in out:
        pre, seg_len, gap = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((0, 9), (2, 21), (0, 5)))
        seg = _words(gen, seg_len, distinct=True)
        first = 1 + pre
        second = first + seg_len + gap
        row[first:first + seg_len] = seg
        end = min(second + seg_len, seq_len)
        row[second:end] = seg[: end - second]
    return out


def bigram_walks(batch: int, seq_len: int, gen: torch.Generator, pool: int = 24, stay: float = 0.75
                 ) -> Int[torch.Tensor, "batch seq_len"]:
    """``[batch seq_len]``: in-context bigrams (Bietti et al. 2023). Each sequence draws ``pool`` words and a
    random successor for each; after bos, every next word is the current word's successor with
    probability ``stay``, else a random pool word. A word's successor is known only from its earlier
    occurrences, at random distances, which rewards a previous-token head feeding an induction head."""
    out = torch.zeros(batch, seq_len, dtype=torch.long)
    for row in out:
        words = _words(gen, pool, distinct=True)
        succ = torch.randperm(pool, generator=gen)
        jump = torch.rand(seq_len, generator=gen) > stay
        rand = torch.randint(0, pool, (seq_len,), generator=gen)
        cur = int(rand[0])
        for t in range(1, seq_len):
            row[t] = words[cur]
            cur = int(rand[t]) if jump[t] else int(succ[cur])
    return out


def training_batch(batch: int, seq_len: int, gen: torch.Generator) -> Int[torch.Tensor, "batch seq_len"]:
    """Training sequences ``[batch seq_len]``: half :func:`repeated_segments`, half :func:`bigram_walks`."""
    half = batch // 2
    return torch.cat([repeated_segments(half, seq_len, gen), bigram_walks(batch - half, seq_len, gen)])


def repeat_losses(model, seed: int = 12345, batch: int = 256, seg_len: int = 12) -> tuple[float, float]:
    """Mean next-token loss (nats) over the first and the second occurrence of a repeated segment
    (predicting tokens 2..seg_len of each occurrence, so both average the same number of predictions)."""
    gen = torch.Generator().manual_seed(seed)
    seg = torch.stack([torch.randperm(N_WORDS, generator=gen)[:seg_len] for _ in range(batch)])
    ids = torch.cat([torch.zeros(batch, 1, dtype=torch.long), seg + FIRST_WORD_ID,
                     seg + FIRST_WORD_ID], dim=1)
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # nll[:, t] predicts token t + 1
    first = nll[:, 1:seg_len].mean().item()
    second = nll[:, seg_len + 1: 2 * seg_len].mean().item()
    return first, second


@dataclass(frozen=True)
class InductionPairs:
    """Clean/corrupted prompts for patching the induction circuit.

    ``clean [batch pos]`` = (bos,) a segment ``A`` of distinct words, then ``A[:query+1]``: the last token
    ``A[query]`` occurred before, followed by ``A[query+1]`` (the ``answer``). ``corrupted`` is ``clean`` with
    that earlier occurrence of ``A[query]`` replaced by a word not in ``A`` (``wrong``): the last token has no
    earlier occurrence left. The pair differs in one token, which reaches the prediction through the
    previous-token head (at the next position) and the induction head.
    ``answer``/``wrong`` are ``[batch]`` token ids: the clean continuation, and the replacing word.
    """

    clean: torch.Tensor
    corrupted: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor
    seg_len: int
    query: int
    offset: int = 1

    @property
    def prev_pos(self) -> int:
        """Position of the earlier occurrence of the last token in ``clean`` (``offset`` = 1 with a bos)."""
        return self.offset + self.query


def induction_pairs(batch: int = 8, seg_len: int = 10, query: int | None = None, seed: int = 0,
                    vocab: torch.Tensor | None = None, bos: int | None = 0) -> InductionPairs:
    """``batch`` clean/corrupted pairs of length ``seg_len + query + 1`` (plus 1 with ``bos``); see
    :class:`InductionPairs`.

    ``query`` (default ``seg_len - 2``) is the index in ``A`` of the final token; it must leave a next word.
    ``vocab`` (``[n]`` token ids, default the zoo words) is what segments are drawn from, so any model's
    vocabulary works; ``bos`` (``None`` for none) starts every sequence.
    """
    query = seg_len - 2 if query is None else query
    vocab = torch.arange(N_WORDS) + FIRST_WORD_ID if vocab is None else torch.as_tensor(vocab).reshape(-1)
    if not 0 <= query <= seg_len - 2:
        raise ValueError(f"induction_pairs: query must be in [0, {seg_len - 2}] for seg_len={seg_len}, got {query}")
    if seg_len + 1 > len(vocab):
        raise ValueError(f"induction_pairs: seg_len must be < {len(vocab)} (the vocabulary size), got {seg_len}")
    gen = torch.Generator().manual_seed(seed)
    start = torch.tensor([] if bos is None else [bos], dtype=torch.long)
    off = len(start)
    clean, corrupted, answer, wrong = [], [], [], []
    for _ in range(batch):
        words = vocab[torch.randperm(len(vocab), generator=gen)[: seg_len + 1]].long()
        seg, other = words[:seg_len], words[seg_len]
        row = torch.cat([start, seg, seg[: query + 1]])
        bad = row.clone()
        bad[off + query] = other
        clean.append(row)
        corrupted.append(bad)
        answer.append(seg[query + 1])
        wrong.append(other)
    return InductionPairs(torch.stack(clean), torch.stack(corrupted), torch.stack(answer), torch.stack(wrong),
                          seg_len, query, off)
