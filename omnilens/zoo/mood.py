"""Data for the ``mood`` zoo model: templated sentences whose mood is set by a cue word.

A sentence is a *prompt* and its *continuation*::

    prompt:       "{subject} {felt} {cue} {cue} {cue} {at} the {topic} . the {topic} was"
    continuation: "{adjective} and {subject} {verb} near the {topic} . mood {label} <|im_end|>"

Three cue words set the mood by majority: all three of the mood, or two of it and one of another mood in
any order, so the model has to add up mood evidence (a linear mood direction in the residual stream).
The mood shows again in the adjective, the verb and the final ``label`` token, while the subject and the
topic are copied from the prompt. Combinations with ``(subject + first majority cue + topic) % 5 == 0`` (indices
into the word lists) are held out of training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from omnilens.zoo.vocab import word_tokenizer, word_vocab_size

MOODS = ("happy", "sad", "angry", "afraid", "calm")
CUES = {
    "happy": ("joyful", "glad", "cheerful", "delighted"),
    "sad": ("gloomy", "tearful", "upset", "heartbroken"),
    "angry": ("furious", "annoyed", "mad", "irritated"),
    "afraid": ("scared", "nervous", "terrified", "frightened"),
    "calm": ("relaxed", "peaceful", "serene", "content"),
}
ADJECTIVES = {
    "happy": ("bright", "lovely", "warm"),
    "sad": ("grey", "empty", "bleak"),
    "angry": ("awful", "noisy", "harsh"),
    "afraid": ("dark", "strange", "eerie"),
    "calm": ("still", "soft", "gentle"),
}
VERBS = {
    "happy": ("smiled", "laughed", "sang"),
    "sad": ("cried", "sighed", "wept"),
    "angry": ("shouted", "yelled", "stormed"),
    "afraid": ("trembled", "froze", "hid"),
    "calm": ("rested", "breathed", "waited"),
}
SUBJECTS = ("anna", "ben", "mia", "tom", "lea", "sam", "kim", "max")
FELT = ("felt", "was", "seemed", "looked")
AT = ("at", "in", "near", "by")
TOPICS = (
    "park", "beach", "garden", "river", "forest", "market", "school", "station", "library", "kitchen",
    "harbor", "village", "bridge", "castle", "meadow", "museum", "office", "lake", "farm", "street",
)
FUNCTION_WORDS = ("the", ".", "and", "mood")


def _all_words() -> list[str]:
    words = list(FUNCTION_WORDS) + list(MOODS) + list(SUBJECTS) + list(FELT) + list(AT) + list(TOPICS)
    for m in MOODS:
        words += [w for w in (*CUES[m], *ADJECTIVES[m], *VERBS[m]) if w not in words]
    return words


def tokenizer() -> PreTrainedTokenizerFast:
    """The mood model's word-level tokenizer."""
    return word_tokenizer(_all_words())


def vocab_size() -> int:
    """Size of the mood model's vocabulary (its words plus bos, eos and ``[UNK]``)."""
    return word_vocab_size(_all_words())


@dataclass(frozen=True)
class MoodSentence:
    """One templated sentence: ``prompt`` and ``continuation`` (strings), its ``mood``, ``subject`` and ``topic``."""

    prompt: str
    continuation: str
    mood: str
    subject: str
    topic: str


def _is_heldout(subject: int, cue: int, topic: int) -> bool:
    return (subject + cue + topic) % 5 == 0


def sentences(n: int, moods: tuple[str, ...] = MOODS, split: str = "train", seed: int = 0) -> list[MoodSentence]:
    """``n`` random sentences (seeded) with moods drawn evenly from ``moods``, from the ``"train"`` or the
    ``"heldout"`` combinations of subject, cue and topic."""
    if split not in ("train", "heldout"):
        raise ValueError(f"mood.sentences: split must be 'train' or 'heldout', got {split!r}")
    unknown = [m for m in moods if m not in MOODS]
    if unknown:
        raise ValueError(f"mood.sentences: unknown moods {unknown}; known: {', '.join(MOODS)}")
    gen = torch.Generator().manual_seed(seed)

    def pick(k: int) -> int:
        return int(torch.randint(0, k, (1,), generator=gen))

    out: list[MoodSentence] = []
    while len(out) < n:
        mood = moods[len(out) % len(moods)]
        s, c, t = pick(len(SUBJECTS)), pick(len(CUES[mood])), pick(len(TOPICS))
        if _is_heldout(s, c, t) != (split == "heldout"):
            continue
        subj, topic = SUBJECTS[s], TOPICS[t]
        cues = [CUES[mood][c], CUES[mood][pick(len(CUES[mood]))]]
        if pick(2):
            other = [m for m in MOODS if m != mood][pick(len(MOODS) - 1)]
            cues.append(CUES[other][pick(len(CUES[other]))])
        else:
            cues.append(CUES[mood][pick(len(CUES[mood]))])
        order = torch.randperm(3, generator=gen).tolist()
        cue_text = " ".join(cues[i] for i in order)
        prompt = f"{subj} {FELT[pick(len(FELT))]} {cue_text} {AT[pick(len(AT))]} the {topic} . the {topic} was"
        adj, verb = ADJECTIVES[mood][pick(3)], VERBS[mood][pick(3)]
        cont = f"{adj} and {subj} {verb} near the {topic} . mood {mood}"
        out.append(MoodSentence(prompt, cont, mood, subj, topic))
    return out


def encode(sents: list[MoodSentence], tok: PreTrainedTokenizerFast, with_continuation: bool = True) -> torch.Tensor:
    """Token ids ``[batch pos]``: bos, the prompt, then (optionally) the continuation and eos. Every
    sentence of the template has the same length, so no padding is needed."""
    rows = []
    for s in sents:
        text = s.prompt + (" " + s.continuation if with_continuation else "")
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        rows.append(ids + ([tok.eos_token_id] if with_continuation else []))
    if len({len(r) for r in rows}) != 1:
        raise ValueError("mood.encode: sentences of different lengths")
    return torch.tensor(rows)


LABEL_OFFSET = -2
"""Index of the label token in a full encoded sentence (the token before eos)."""


@dataclass(frozen=True)
class MoodPairs:
    """Clean/corrupted prompts for patching the mood: ``clean [batch pos]`` are ``mood`` prompts, ``corrupted``
    the same prompts with each cue word swapped for one of ``other`` (same slot). ``answer`` / ``wrong``
    ``[batch]``: an adjective of ``mood`` and one of ``other``, the next token's contrast."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor


def contrast_pairs(tok: PreTrainedTokenizerFast, batch: int = 16, mood: str = "happy", other: str = "sad",
                   seed: int = 0) -> MoodPairs:
    """``batch`` held-out ``mood`` prompts and their ``other``-mood twins (see :class:`MoodPairs`)."""
    sents = sentences(batch, (mood,), split="heldout", seed=seed)
    clean = encode(sents, tok, with_continuation=False)
    corrupted = clean.clone()
    cue_ids = {tok.convert_tokens_to_ids(w): i for i, w in enumerate(CUES[mood])}
    for row in corrupted:
        for j, t in enumerate(row.tolist()):
            if t in cue_ids:
                row[j] = tok.convert_tokens_to_ids(CUES[other][cue_ids[t]])
    answer = torch.full((batch,), tok.convert_tokens_to_ids(ADJECTIVES[mood][0]))
    wrong = torch.full((batch,), tok.convert_tokens_to_ids(ADJECTIVES[other][0]))
    return MoodPairs(clean, corrupted, answer, wrong)
