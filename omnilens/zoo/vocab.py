"""Word-level tokenizers for the zoo models, built without a hub and saved next to the weights."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS = "<|endoftext|>"
EOS = "<|im_end|>"
UNK = "[UNK]"


def word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: id 0 = ``<|endoftext|>`` (bos and pad), 1 = ``<|im_end|>`` (eos),
    then ``words`` in order, then ``[UNK]``. Decoding joins words with spaces."""
    if len(set(words)) != len(words):
        raise ValueError("word_tokenizer: the word list has duplicates")
    vocab = {tok: i for i, tok in enumerate([BOS, EOS, *words, UNK])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, pad_token=BOS, bos_token=BOS, eos_token=EOS,
    )
    fast.padding_side = "right"
    return fast


def word_vocab_size(words: Sequence[str]) -> int:
    """Vocabulary size of :func:`word_tokenizer` over ``words``: the words plus bos, eos and ``[UNK]``."""
    return len(words) + 3  # BOS, EOS, UNK
