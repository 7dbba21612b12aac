"""Tokenizers for preset-built BLIP / BLIP-2 models, made offline and deterministically.

Real checkpoints bring their own tokenizer (bert-base-uncased for BLIP, GPT-2 BPE for OPT).
Without the hub we build small stand-ins of the same kind, so the same processor code runs:

* `bert_tokenizer`: a WordPiece `BertTokenizer` over an in-memory vocabulary: BERT's special
  tokens, BLIP's `[DEC]` (the decoder's bos) and `[ENC]`, every lowercase letter, digit and
  punctuation mark both as a word and as a `##` continuation (so any ASCII word tokenizes to
  pieces instead of `[UNK]`), and whole words common in image captions.
* `opt_tokenizer`: a byte-level BPE (GPT-2 / OPT style: `</s>` is both bos and eos, `<pad>`)
  trained with `tokenizers` on sentences made from the same words; it encodes any text.

Both are pure functions of the word list below, so a model saved with one reloads with the
same ids. Their files travel with `save_pretrained`; a reload never calls these again.
"""

from __future__ import annotations

import functools
import string

__all__ = ["CAPTION_WORDS", "bert_tokenizer", "bert_vocab", "opt_tokenizer"]

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0..3

# Words of captions (the demo's digit captions and web-caption noise); more is harmless.
CAPTION_WORDS = tuple(
    """
    a an the of picture photo image images digit digits number numeral numerals handwritten hand written
    drawn drawing by on in with and or at for to from is are this that pen pencil paper ink dark
    light white black blue background close up small large scanned scan showing shows shown
    zero one two three four five six seven eight nine ten
    click here free shipping best deals buy now cheap watches online sale off img jpg dsc untitled stock
    royalty download subscribe more great content product thumbnail png home about contact loading
    screenshot page site web www com http https new top
    """.split()
)

_CHARS = string.ascii_lowercase + string.digits
_PUNCT = string.punctuation


def bert_vocab() -> dict[str, int]:
    """The WordPiece vocabulary: specials first ([PAD] = 0, as BLIP's config expects), then pieces."""
    vocab: dict[str, int] = {}
    for token in (*BERT_SPECIALS, *_CHARS, *_PUNCT, *(f"##{c}" for c in _CHARS), *CAPTION_WORDS):
        vocab.setdefault(token, len(vocab))
    return vocab


def bert_tokenizer(model_max_length: int = 512):
    """A fresh lowercase WordPiece tokenizer with BLIP's special tokens ([DEC] as bos)."""
    from transformers import BertTokenizer

    return BertTokenizer(
        vocab=bert_vocab(),
        bos_token="[DEC]",
        extra_special_tokens=["[ENC]"],
        model_max_length=model_max_length,
    )


def _opt_corpus() -> list[str]:
    words = list(CAPTION_WORDS)
    # Deterministic "sentences": every word after a few caption openings, and runs of 8 words.
    openings = ("a picture of", "a photo of the", "the number", "a handwritten")
    lines = [f"{o} {w}" for o in openings for w in words]
    lines += [" ".join(words[i : i + 8]) for i in range(0, len(words), 4)]
    return lines


@functools.lru_cache(maxsize=1)
def _opt_tokenizer_json() -> str:
    """The trained byte-level BPE, serialized (training is deterministic; cache it per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(OPT_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_opt_corpus(), trainer)
    bos = tok.token_to_id("</s>")
    # OPT prepends </s> (its bos) and appends nothing; training appends eos itself.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos)]
    )
    return tok.to_str()


def opt_tokenizer(model_max_length: int = 2048):
    """A fresh GPT-2/OPT-style byte-level BPE tokenizer (bos = eos = `</s>`, pad `<pad>`)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_opt_tokenizer_json()),
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
