"""An offline tokenizer for config-built (random) LMs: byte-level BPE learned from a fixed word list.

Tiny test and demo LMs have no tokenizer on disk and there is no hub access, so we build one: byte-level
BPE (GPT-2's scheme, so any text round-trips and nothing maps to <unk>) trained at build time on a fixed,
in-code corpus of caption and digit vocabulary, and of the made-up words (`NONCE_WORDS`) the novel-mapping
task maps digits to. Each of those words is one token here, as a common short word is one token of a real LM's
tokenizer: split into letters (" zugi" -> " ", "z", "u", "g", "i") the tiny LMs cannot learn to copy them
from context, since the first letter is two tokens after the key. Training is deterministic for a fixed corpus
and settings, so every process builds the same ids. It takes a few milliseconds.
"""

from __future__ import annotations

import random

from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
OFFLINE_VOCAB_SIZE = 509  # at most: byte alphabet (256) + eos + merges; LM configs need vocab_size >= this + 3


def nonce_words(n: int, seed: int = 0) -> list[str]:
    """`n` distinct made-up words ("dax", "blicket"-like: 1-2 consonant-vowel syllables and an optional
    final consonant), the same for a given seed in every process. None is an English number word."""
    rng = random.Random(seed)
    consonants, vowels, finals = "bcdfghjklmnprstvwz", "aeiou", ("", "", "k", "p", "t", "x")
    reserved = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "not"}
    out: list[str] = []
    seen = set(reserved)
    while len(out) < n:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 2)))
        word += rng.choice(finals)
        if len(word) >= 3 and word not in seen:
            seen.add(word)
            out.append(word)
    return out


# The pool every novel mapping draws from (training and the eval): words no caption holds, each a single
# token of the offline tokenizer (" " + word). 48 is what fits beside the caption vocabulary in 509 ids.
NONCE_WORDS = nonce_words(48)

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
    # Repeats make the digit words and template words win the first merges; the nonce words come after a
    # space, as they do in text, so each merges into one " word" token.
    return lines * 4 + [" " + " ".join(NONCE_WORDS)] * 8


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
