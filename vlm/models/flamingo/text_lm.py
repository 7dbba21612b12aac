"""Text-only pretraining of a config-built causal LM on caption text: the "pretrained LM" for offline runs.

Flamingo freezes a *pretrained* LM (Alayrac et al. 2022 use Chinchilla; OpenFlamingo MPT / Llama): the LM
brings the language, the new layers only bring in the images. Offline, in tests and in the demo there is no
pretrained tiny LM on disk, and a frozen *random* LM has no language for cross-attention to build on (on
the digit captions it stays at chance). This step stands in for the LM's own pretraining: next-token
prediction on the training captions' text, one `{prompt} {caption}` per pair, eos-separated and packed into
fixed-length rows, all LM weights trained. It writes an ordinary transformers model directory (weights +
tokenizer) that `FlamingoConfig.lm_name_or_path` then points at, exactly as a user's own local LM would be;
Flamingo training freezes it as usual. It sees text only: no images, nothing of the held-out split.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm.models.flamingo.tokenizer import NONCE_WORDS

DONE_MARKER = "_SUCCESS"  # written last: a directory without it is an unfinished run


@dataclass
class TextLMTraining:
    steps: int = 600
    lr: float = 3e-3
    batch_size: int = 8  # rows of seq_len tokens per step
    seq_len: int = 256
    warmup_steps: int = 20  # linear warmup, then cosine decay to 0
    seed: int = 0


def pair_text(caption: str, prompt: str) -> str:
    """The text of one pair as Flamingo's sequences hold it, without the image token."""
    return f"{prompt} {caption}" if prompt else caption


def copy_texts(classes: list[str], n: int, pairs: int, prompt: str, rng: random.Random) -> list[str]:
    """`n` texts that can only be continued by copying from earlier in the text (induction, which pretrained
    LMs learn from the web): each is `pairs` of `{prompt} {class} {word}` under a fresh random mapping class ->
    nonce word, the classes drawn from a few (bursty), so a class that comes back is followed by its word."""
    out = []
    for _ in range(n):
        chosen = rng.sample(classes, min(rng.randint(2, max(2, pairs // 2)), len(classes)))
        words = dict(zip(chosen, rng.sample(NONCE_WORDS, len(chosen))))
        seq = [rng.choice(chosen) for _ in range(pairs)]
        out.append(" ".join(f"{pair_text(c, prompt)} {words[c]}" for c in seq))
    return out


def token_rows(tokenizer, texts: list[str], rows: int, seq_len: int, rng: random.Random) -> torch.Tensor:
    """(rows, seq_len) int64: texts in a shuffled order, each followed by eos, packed end to end."""
    eos = tokenizer.eos_token_id
    encoded = [ids + [eos] for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    need = rows * seq_len
    stream: list[int] = []
    while len(stream) < need:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in order:
            stream += encoded[i]
    return torch.tensor(stream[:need], dtype=torch.long).view(rows, seq_len)


def document_attention(ids: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, 1, T, T) bool, position_ids (B, T)) for packed rows `ids` (B, T): each token sees only the
    earlier tokens of its own text (texts end at `eos`, which belongs to the text it ends), and positions
    restart at every text, as in a sequence of its own.

    Without the mask, packed copy texts read each other: the same class under another text's mapping comes
    earlier in the row, and copying from context is not learnt (a tiny GPT-2 then copies a random word of
    the context: 2 examples, 50%; with mask and positions, 100%). Row positions instead of restarted ones
    also leave it at 58%: a previous-token head has to be learnt at every one of the row's positions.
    """
    ends = (ids == eos).long()
    doc = torch.cumsum(ends, dim=1) - ends  # (B, T) text index within the row
    t = ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    index = torch.arange(t, device=ids.device).expand_as(ids)
    begins = torch.nn.functional.pad(ends[:, :-1], (1, 0)).bool()  # a text begins after each eos
    starts = torch.cummax(torch.where(begins, index, torch.zeros_like(index)), dim=1).values
    return mask[:, None], index - starts


def documents(texts: list[str], per_document: int) -> list[str]:
    """`texts` joined `per_document` at a time (space-separated): pair texts shaped like a Flamingo sequence
    of that many pairs, so pretraining trains the positions Flamingo's sequences use."""
    return [" ".join(texts[i : i + per_document]) for i in range(0, len(texts), max(1, per_document))]


def is_done(out_dir: str | Path) -> bool:
    """A finished LM directory (a path or URL): its marker is there."""
    from vlm import storage

    return storage.is_file(storage.join(out_dir, DONE_MARKER))


def pretrain_text_lm(lm, tokenizer, texts: list[str], out_dir: str | Path, train: TextLMTraining) -> dict[str, float]:
    """Train `lm` (a transformers causal LM, all weights) on `texts`; save it and `tokenizer` to `out_dir`.

    Returns {"lm_pretrain_loss_first", "lm_pretrain_loss_last" (mean of the last 20 steps), "lm_pretrain_seconds"}.
    """
    if not texts:
        raise ValueError("no caption text to pretrain the LM on")
    torch.manual_seed(train.seed)
    rng = random.Random(train.seed)
    start = time.time()
    # Enough rows for every step, drawn once: a few MB of token ids even for long runs.
    data = token_rows(tokenizer, texts, train.steps * train.batch_size, train.seq_len, rng)
    lm.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, betas=(0.9, 0.98), weight_decay=0.0)
    losses = []
    for step in range(train.steps):
        warm = min(1.0, (step + 1) / max(1, train.warmup_steps))
        for group in opt.param_groups:
            group["lr"] = train.lr * warm * 0.5 * (1 + math.cos(math.pi * step / train.steps))
        batch = data[step * train.batch_size : (step + 1) * train.batch_size]  # (batch_size, seq_len)
        mask, position_ids = document_attention(batch, tokenizer.eos_token_id)
        loss = lm(input_ids=batch, attention_mask=mask, position_ids=position_ids, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    lm.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / DONE_MARKER).write_text("")
    tail = losses[-20:]
    return {
        "lm_pretrain_loss_first": losses[0],
        "lm_pretrain_loss_last": sum(tail) / len(tail),
        "lm_pretrain_seconds": time.time() - start,
    }
