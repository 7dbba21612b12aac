"""An offline tokenizer for config-built (random) LMs: byte-level BPE learned from a fixed word list.

Tiny test and demo LMs have no tokenizer on disk and there is no hub access, so we build one: byte-level
BPE (GPT-2's scheme, so any text round-trips and nothing maps to <unk>) trained at build time on a fixed,
in-code corpus of caption and digit vocabulary. Training is deterministic for a fixed corpus and settings,
so every process builds the same ids. It takes a few milliseconds.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
OFFLINE_VOCAB_SIZE = 384  # byte alphabet (256) + eos + merges; LM configs for it need vocab_size >= this + 3

_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEMPLATES = [
    "a photo of the digit {w}",
    "a handwritten {w}",
    "the number {w}",
    "an image of a {w}",
    "a blurry picture of the digit {w}",
    "a drawing of the number {w}",
    "Output: {w}",
    "Question: what digit is this? Answer: {w}",
    "This is a {w}. It is the digit {d}.",
]


def _corpus() -> list[str]:
    lines = [t.format(w=w, d=d) for t in _TEMPLATES for d, w in enumerate(_DIGITS)]
    return lines * 4  # repeats make the digit words and template words win the first merges


def offline_tokenizer(vocab_size: int = OFFLINE_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer that needs no files or network; eos = bos = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)
