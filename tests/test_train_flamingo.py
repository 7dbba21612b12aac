"""Flamingo training: data transforms, few-shot eval, export, and ZeRO-3 training on a local Ray + MLflow."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.train_flamingo import TrainFlamingoConfig, train_flamingo
from vlm.config import load_config
from vlm.data.flamingo_data import (
    FlamingoDataConfig,
    FlamingoPreprocess,
    collate_mmc4,
    flamingo_tokenizer,
)
from vlm.errors import ConfigError, InputError
from vlm.testbed.digit_shards import write_digit_shards

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=1",
    "train.global_batch_size=8",
    "train.log_every=2",
    "optim.lr=5e-3",
    "optim.eps=1e-8",
    "optim.warmup_steps=2",
    "model.freeze_lm_embeddings=false",
    "data.images_per_sequence=4",
    "data.max_length=96",
    "eval.limit=4",
    "eval.max_new_tokens=6",
]


def cfg_for(*overrides: str) -> TrainFlamingoConfig:
    return load_config(TrainFlamingoConfig, None, [*TINY, *overrides])


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    """Clean digit shards in ingest's layout."""
    out = tmp_path_factory.mktemp("digits")
    write_digit_shards(out, 256, samples_per_shard=128, image_size=32)
    return out


def png(value: int, size: int = 40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 128)).save(buf, format="PNG")
    return buf.getvalue()


def pair_batch(captions: list[str]) -> dict:
    n = len(captions)
    return {
        "__key__": [f"{i:09d}" for i in range(n)],
        "png": [png(20 * i) for i in range(n)],
        "txt": [c.encode() for c in captions],
    }


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


# ------------------------------------------------------------------ data


def test_pairs_label_only_captions_and_end_of_chunk():
    """Pair rows: labels are -100 on <image>, on the prompt and on padding; captions and <|endofchunk|> train."""
    tok = flamingo_tokenizer(None)
    data = FlamingoDataConfig(images_per_sequence=2, max_length=48, augment=False)
    out = FlamingoPreprocess(None, 16, data)(pair_batch(["a handwritten digit seven", "the number 2", "nine"]))
    assert out["images"].shape == (2, 2, 1, 3, 16, 16) and out["images"].dtype == np.float32
    for key in ("input_ids", "attention_mask", "labels"):
        assert out[key].shape == (2, 48) and out[key].dtype == np.int64
    ids, labels, mask = out["input_ids"][0], out["labels"][0], out["attention_mask"][0]
    n = int(mask.sum())
    assert decode(tok, ids[:n]) == (
        "<image>Output: a handwritten digit seven<|endofchunk|><image>Output: the number 2<|endofchunk|>"
    )
    assert (ids[n:] == tok.pad_token_id).all() and (labels[n:] == -100).all()
    trained = labels[:n][labels[:n] != -100]
    assert decode(tok, trained) == " a handwritten digit seven<|endofchunk|> the number 2<|endofchunk|>"
    media = tok.convert_tokens_to_ids("<image>")
    assert (labels[ids == media] == -100).all()
    # The second row holds the third pair and one zero-padded image slot.
    assert decode(tok, out["input_ids"][1][out["attention_mask"][1] == 1]) == "<image>Output: nine<|endofchunk|>"
    assert out["images"][1, 1].max() == 0 and out["images"][1, 0].std() > 0


def test_packing_keeps_image_tokens_within_images_and_length():
    """Packing stops at images_per_sequence and max_length; every <image> token has a real image."""
    tok = flamingo_tokenizer(None)
    media = tok.convert_tokens_to_ids("<image>")
    data = FlamingoDataConfig(images_per_sequence=3, max_length=24, augment=False)
    captions = ["a small handwritten number 7", "seven", "a close-up of the number seven on a light background"] * 3
    out = FlamingoPreprocess(None, 8, data)(pair_batch(captions))
    images_used = (np.abs(out["images"]).reshape(*out["images"].shape[:2], -1).max(-1) > 0).sum(1)  # (B,)
    tokens = (out["input_ids"] == media).sum(1)
    assert (tokens == images_used).all() and (tokens >= 1).all() and (tokens <= 3).all()
    assert tokens.sum() == len(captions)  # no pair lost
    assert out["attention_mask"].sum(1).max() <= 24
    # The over-long caption alone fills a row, cut at max_length, its <image> first.
    long_rows = out["attention_mask"].sum(1) == 24
    assert long_rows.any() and (out["input_ids"][long_rows, 0] == media).all()


def mmc4_doc() -> dict:
    return {
        "text_list": ["An intro.", "A cat sits.", "It naps.", "A dog runs.", "The end."],
        "image_info": [
            {"matched_text_index": 3, "image_base64": base64.b64encode(png(200)).decode(), "matched_sim": 0.3},
            {"matched_text_index": 1, "image_bytes": png(10), "matched_sim": 0.4},
            {"matched_text_index": 4, "image_index": 0, "matched_sim": 0.1},
        ],
        "images": [png(90)],
    }


def test_mmc4_document_becomes_interleaved_sequence():
    """MMC4: <image> before matched sentences, chunks closed by <|endofchunk|>, low-similarity images dropped."""
    tok = flamingo_tokenizer(None)
    data = FlamingoDataConfig(images_per_sequence=4, max_length=64, augment=False, mmc4_min_sim=0.2)
    out = collate_mmc4([mmc4_doc()], tok, data, image_size=16)
    n = int(out["attention_mask"][0].sum())
    assert decode(tok, out["input_ids"][0, :n]) == (
        "An intro.<image>A cat sits. It naps.<|endofchunk|><image>A dog runs. The end.<|endofchunk|>"
    )
    media = tok.convert_tokens_to_ids("<image>")
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert (labels[ids == media] == -100).all() and (labels[:n][ids[:n] != media] == ids[:n][ids[:n] != media]).all()
    assert (labels[n:] == -100).all()
    # Images in text order: the one matched to sentence 1 first (red 10), then sentence 3's (red 200).
    red = out["images"][0, :, 0, 0].mean(axis=(1, 2))
    assert red[0] < red[1] and out["images"][0, 2:].max() == 0


def test_mmc4_cut_drops_images_whose_token_was_cut():
    """A document cut at max_length keeps only images whose <image> survived; the model accepts the row."""
    from vlm.models.flamingo import build_flamingo, flamingo_preset

    tok = flamingo_tokenizer(None)
    media = tok.convert_tokens_to_ids("<image>")
    data = FlamingoDataConfig(images_per_sequence=4, max_length=12, augment=False)
    out = collate_mmc4([mmc4_doc()], tok, data, image_size=32)
    kept = int((out["input_ids"][0] == media).sum())
    assert kept == 1 and out["images"][0, 1:].max() == 0 and out["images"][0, 0].std() > 0
    model, _ = build_flamingo(flamingo_preset("tiny"), tokenizer=tok)
    batch = {k: torch.from_numpy(v) for k, v in out.items()}
    loss = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"])["loss"]
    assert torch.isfinite(loss)


def test_tokenizer_is_built_once_per_process():
    """The data tokenizer is cached, and carries Flamingo's tokens as its last ids."""
    tok = flamingo_tokenizer(None)
    assert flamingo_tokenizer(None) is tok
    ids = tok.convert_tokens_to_ids(["<image>", "<|endofchunk|>", "<pad>"])
    assert sorted(ids) == list(range(len(tok) - 3, len(tok)))


def test_offline_tokenizer_has_each_nonce_word_as_one_token():
    """The novel-mapping words are single tokens after a space (what lets a tiny LM copy them from context), no
    caption word is one of them, and the vocabulary fits the tiny LMs' 512 rows with Flamingo's 3 tokens."""
    from vlm.models.flamingo.tokenizer import NONCE_WORDS, OFFLINE_VOCAB_SIZE, offline_tokenizer

    tok = offline_tokenizer()
    assert len(tok) <= OFFLINE_VOCAB_SIZE <= 512 - 3
    assert all(len(tok(" " + w).input_ids) == 1 for w in NONCE_WORDS)
    assert len(tok(" seven").input_ids) == 1 and "seven" not in NONCE_WORDS


# ------------------------------------------------------------------ eval and export


def test_named_digit_reads_words_and_numerals():
    """The eval's answer check finds the first digit named by word or numeral, not inside other words."""
    from vlm.models.flamingo.eval import named_digit

    assert named_digit("a handwritten digit Seven") == 7
    assert named_digit("the number 3 written by hand") == 3
    assert named_digit("someone wrote nine") == 9  # "one" inside "someone" does not count
    assert named_digit("a drawing") is None


def test_eval_queries_are_balanced_over_digits():
    """Queries cycle through the ten digits, so answering one digit always scores chance (0.1)."""
    from vlm.models.flamingo.eval import balanced_queries

    labels = [9, 9, 9, 1, 1, 5, 0, 2, 3, 4, 6, 7, 8, 9]
    picked = balanced_queries(labels, 11)
    assert [labels[i] for i in picked] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1]
    assert picked[-1] == 4 and len(set(picked)) == 11


def test_fewshot_eval_returns_three_accuracies():
    """0/4/8-shot eval of a tiny model returns accuracies in [0, 1] and one sample per decoded query and shot
    count; past generate_limit queries are ranked only."""
    from vlm.models.flamingo import build_flamingo, flamingo_preset
    from vlm.models.flamingo.eval import fewshot_digit_accuracy

    torch.manual_seed(0)
    model, tok = build_flamingo(flamingo_preset("tiny", max_num_media=9))
    samples: list = []
    acc = fewshot_digit_accuracy(model, tok, shots=(0, 4, 8), limit=3, max_new_tokens=3, samples=samples)
    assert set(acc) == {f"fewshot_{k}_{m}" for k in (0, 4, 8) for m in ("acc", "rank_acc")}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert len(samples) == 9 and all(isinstance(text, str) for _, _, text in samples)
    samples.clear()
    fewshot_digit_accuracy(model, tok, shots=(0, 4), limit=3, max_new_tokens=3, samples=samples, generate_limit=1)
    assert len(samples) == 2


def test_novel_mapping_is_one_per_sequence_and_bursty():
    """A novel-mapping sequence captions each class by one fresh nonce word; others keep their caption;
    bursty picks draw from 2 .. n/2 of the batch's classes, never a row without a class."""
    from vlm.data.flamingo_data import NONCE_WORDS, bursty_pick, class_of, novel_mapping

    classes = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert class_of("a handwritten digit Seven.", classes) == 7
    assert class_of("someone wrote it", classes) is None  # "one" inside a word is not the class
    assert len(set(NONCE_WORDS)) == len(NONCE_WORDS) and not set(NONCE_WORDS) & set(classes)
    rng = random.Random(0)
    captions = ["the number two", "a photo of the digit six", "a drawing", "two, by hand"]
    out = novel_mapping(captions, classes, rng)
    assert out[0] == out[3] and out[0] != out[1] and out[2] == "a drawing"
    assert {out[0], out[1]} <= set(NONCE_WORDS)
    assert len({novel_mapping(captions, classes, rng)[0] for _ in range(10)}) > 1  # fresh per sequence
    labels = [i % 10 for i in range(64)] + [None] * 8
    for _ in range(50):
        rows = bursty_pick(labels, 8, rng)
        assert len(rows) == 8 == len(set(rows)) and all(labels[i] is not None for i in rows)
        assert 2 <= len({labels[i] for i in rows}) <= 4
    assert bursty_pick([None, None], 8, rng) == []


def test_preprocess_novel_sequences_keep_one_mapping_each():
    """With novel_fraction=1 every packed sequence's captions are nonce words, one word per class within it;
    only words an earlier pair of the sequence had are targets (a class's first word cannot be known)."""
    classes = ["zero", "one", "two", "three"]
    data = FlamingoDataConfig(images_per_sequence=4, max_length=96, novel_fraction=1.0, novel_classes=classes)
    captions = [f"the number {classes[i % 4]}" for i in range(16)]
    out = FlamingoPreprocess(None, 32, data)(pair_batch(captions))
    tok = flamingo_tokenizer(None)
    media = tok.convert_tokens_to_ids("<image>")
    for ids, labels in zip(out["input_ids"], out["labels"]):
        text = decode(tok, [t for t in ids if t != tok.pad_token_id])
        words = [w.split("Output:")[-1].strip() for w in text.split("<|endofchunk|>") if "Output:" in w]
        assert len(words) == int((ids == media).sum()) >= 2
        assert not any(c in w for w in words for c in classes)
        targets = [w.strip() for w in decode(tok, [t for t in labels if t >= 0]).split("<|endofchunk|>") if w.strip()]
        assert targets == [w for i, w in enumerate(words) if w in words[:i]]


def test_novel_eval_prompts_hold_one_example_of_the_query_digit():
    """Each k-shot novel prompt has exactly one in-context example of the query's digit and k - 1 of distinct
    other digits; the accuracies come back for every k, one sample per prompt."""
    from vlm.models.flamingo import build_flamingo, flamingo_preset
    from vlm.models.flamingo.eval import novel_examples, novel_mapping_accuracy, prompt_gallery
    from vlm.models.flamingo.tokenizer import NONCE_WORDS

    rng = random.Random(0)
    pool = {c: [10 * c + j for j in range(3)] for c in range(10)}
    for k in (1, 2, 4, 8):
        examples = novel_examples(pool, 3, k, rng)
        classes = [i // 10 for i in examples]
        assert len(examples) == k and classes.count(3) == 1 and len(set(classes)) == k
    torch.manual_seed(0)
    model, tok = build_flamingo(flamingo_preset("tiny", max_num_media=9))
    samples: list = []
    acc = novel_mapping_accuracy(model, tok, shots=(0, 2, 4), limit=4, samples=samples)
    assert set(acc) == {"novel_0_acc", "novel_2_acc", "novel_4_acc"} and all(0 <= v <= 1 for v in acc.values())
    assert len(samples) == 12
    for k, examples, words, _, right, answer in samples:
        assert len(examples) == len(words) == k and (k == 0 or right in words) and answer in NONCE_WORDS
    assert prompt_gallery(samples, 64, rows=3).size[0] > 200


def test_class_log_likelihoods_match_one_sequence_at_a_time():
    """The batched class scores equal each caption's summed log-probabilities from its own forward."""
    from vlm.models.flamingo import build_flamingo, flamingo_preset
    from vlm.models.flamingo.eval import class_log_likelihoods

    torch.manual_seed(0)
    model, tok = build_flamingo(flamingo_preset("tiny"))
    model.eval()
    with torch.no_grad():
        for layer in model.flamingo_layers():
            layer.gated_xattn.attn_gate.fill_(0.5)
    images = torch.randn(2, 1, 3, 32, 32)
    prompt = "<image>Output: a handwritten digit two<|endofchunk|><image>Output:"
    captions = ["a handwritten digit seven", "the number 3 written by hand"]
    got = class_log_likelihoods(model, tok, images, prompt, captions)
    for caption, score in zip(captions, got):
        context = tok(prompt).input_ids
        ids = torch.tensor([context + tok(f" {caption}<|endofchunk|>").input_ids])
        with torch.no_grad():
            logp = model(images[None], ids)["logits"][0, :-1].float().log_softmax(-1)
        want = logp[len(context) - 1 :].gather(-1, ids[0, len(context) :, None]).sum()
        assert float(score) == pytest.approx(float(want), abs=1e-4)


def test_text_lm_pretraining_writes_an_lm_flamingo_loads(tmp_path):
    """Caption-text pretraining lowers the LM loss and writes a model + tokenizer dir that Flamingo builds from."""
    import dataclasses

    from vlm.models.flamingo import build_flamingo, flamingo_preset
    from vlm.models.flamingo.build import build_lm, build_tokenizer
    from vlm.models.flamingo.text_lm import TextLMTraining, is_done, pair_text, pretrain_text_lm
    from vlm.testbed.digits import caption_for

    cfg = flamingo_preset("tiny")
    torch.manual_seed(0)
    texts = [pair_text(caption_for(i % 10, random.Random(i)), "Output:") for i in range(64)]
    train = TextLMTraining(steps=80, lr=1e-2, batch_size=4, seq_len=64, warmup_steps=5)
    metrics = pretrain_text_lm(build_lm(cfg), build_tokenizer(cfg), texts, tmp_path / "lm", train)
    assert metrics["lm_pretrain_loss_last"] < 0.5 * metrics["lm_pretrain_loss_first"], metrics
    assert is_done(tmp_path / "lm")
    model, tok = build_flamingo(dataclasses.replace(cfg, lm_name_or_path=str(tmp_path / "lm")))
    assert tok.convert_tokens_to_ids("<image>") == flamingo_tokenizer(None).convert_tokens_to_ids("<image>")
    assert not any(p.requires_grad for p in model.lm.get_input_embeddings().base.parameters())
    assert flamingo_tokenizer(str(tmp_path / "lm")).convert_tokens_to_ids("<image>") == model.media_token_id


def test_packed_texts_attend_only_within_themselves():
    """Text pretraining's document mask: a packed row gives each text the logits it has alone (mask and
    restarted positions), so packed copy texts cannot read each other's mappings; copy texts follow one
    mapping each, from 2 .. pairs // 2 classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlm.models.flamingo.text_lm import copy_texts, document_attention, documents

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=40)
    ).eval()
    a, b = torch.randint(1, 40, (1, 6)), torch.randint(1, 40, (1, 5))
    eos = torch.zeros(1, 1, dtype=torch.long)
    row = torch.cat([a, eos, b, eos], dim=1)
    mask, positions = document_attention(row, 0)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5]]
    with torch.no_grad():
        packed = lm(row, attention_mask=mask, position_ids=positions).logits
        alone = torch.cat([lm(torch.cat([a, eos], 1)).logits, lm(torch.cat([b, eos], 1)).logits], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert documents(["a", "b", "c"], 2) == ["a b", "c"]
    classes = ["zero", "one", "two", "three"]
    for text in copy_texts(classes, 20, 8, "Output:", random.Random(0)):
        pairs = [p.split() for p in text.split("Output:")[1:]]
        assert len(pairs) == 8 and 2 <= len({c for c, _ in pairs}) <= 4
        assert all(len({w for c2, w in pairs if c2 == c}) == 1 for c, _ in pairs)


def test_shard_captions_follow_caption_source(tmp_path):
    """Captions are read from the shards' txt/json (synthetic when asked and present), up to a limit."""
    from vlm.data import shards as sh
    from vlm.data.flamingo_data import shard_captions

    writer = sh.ShardWriter(tmp_path, 0)
    for i in range(3):
        meta = {"candidates": [{"text": f"synthetic {i}", "source": "synthetic", "kept": True}]} if i else {}
        writer.write_sample(f"{i:09d}", png(10), "png", f"web caption {i}", meta)
    writer.close()
    tars = [str(sh.tar_path(tmp_path, 0))]
    assert shard_captions(tars, "original") == ["web caption 0", "web caption 1", "web caption 2"]
    assert shard_captions(tars, "synthetic", limit=2) == ["web caption 0", "synthetic 1"]


def test_export_reloads_with_the_same_outputs(tmp_path):
    """An export (weights + config + tokenizer) reloads on its own and gives the same logits."""
    from vlm.models.flamingo import build_flamingo, flamingo_preset
    from vlm.models.flamingo.build import EXPORT_TRAINABLE, export_flamingo, gate_values, load_flamingo_export

    torch.manual_seed(0)
    cfg = flamingo_preset("tiny")
    model, tok = build_flamingo(cfg, tokenizer=flamingo_tokenizer(None))
    with torch.no_grad():
        for layer in model.flamingo_layers():
            layer.gated_xattn.attn_gate.fill_(0.5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    export_flamingo(model.state_dict(), cfg, tok, tmp_path, trainable=trainable)
    loaded, tok2 = load_flamingo_export(tmp_path)
    ids = tok2("<image>Output: seven<|endofchunk|>", return_tensors="pt").input_ids
    images = torch.randn(1, 1, 1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids)["logits"], model.eval()(images, ids)["logits"])
    from safetensors.torch import load_file

    small = load_file(str(tmp_path / EXPORT_TRAINABLE))
    assert set(small) == set(trainable) and not any(k.startswith("vision_encoder.") for k in small)
    assert gate_values(small) == pytest.approx({"attn_l0": 0.4621, "ff_l0": 0.0, "attn_l1": 0.4621, "ff_l1": 0.0}, 1e-3)


def test_export_of_an_lm_from_a_directory_needs_no_directory(tmp_path):
    """With the LM given by path (no lm_config), the export still reloads after that directory is gone."""
    import dataclasses
    import shutil

    from vlm.models.flamingo import build_flamingo, flamingo_preset
    from vlm.models.flamingo.build import build_lm, build_tokenizer, export_flamingo, load_flamingo_export

    torch.manual_seed(0)
    tiny = flamingo_preset("tiny")
    lm_dir = tmp_path / "lm"
    build_lm(tiny).save_pretrained(str(lm_dir))
    build_tokenizer(tiny).save_pretrained(str(lm_dir))
    cfg = dataclasses.replace(tiny, lm_name_or_path=str(lm_dir), lm_config=None)
    model, tok = build_flamingo(cfg)
    export_flamingo(model.state_dict(), cfg, tok, tmp_path / "export")
    shutil.rmtree(lm_dir)
    loaded, tok2 = load_flamingo_export(tmp_path / "export")
    ids = tok2("<image>Output: seven<|endofchunk|>", return_tensors="pt").input_ids
    images = torch.randn(1, 1, 1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids)["logits"], model.eval()(images, ids)["logits"])


# ------------------------------------------------------------------ bad input (before Ray starts)


def test_clip_export_dir_supplies_the_vision_tower(tmp_path):
    """A `vlm train clip` export directory is accepted as vision_checkpoint, with its own architecture."""
    import open_clip

    from pipelines.train_flamingo import check_vision_checkpoint, model_config, vision_image_size
    from vlm.models.clip.build import export_clip
    from vlm.models.clip.build import model_config as clip_model_config

    clip_cfg = clip_model_config("vlm-clip-tiny")
    export_clip(open_clip.CLIP(**clip_cfg).state_dict(), clip_cfg, tmp_path / "clip", "vlm-clip-tiny")
    mcfg = model_config(cfg_for(f"vision_checkpoint={tmp_path / 'clip'}"))
    assert mcfg.vision_model == clip_cfg and mcfg.vision_checkpoint.endswith("open_clip_model.safetensors")
    assert mcfg.max_num_media == 9  # raised to what the 8-shot eval needs
    check_vision_checkpoint(mcfg)
    assert vision_image_size(mcfg) == 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.novel_fraction=1.5"], r"data.novel_fraction must be in \[0, 1\], got 1.5"),
        (["data.novel_fraction=0.2"], "data.novel_fraction > 0 needs data.novel_classes"),
        (["data.novel_classes=[" + ",".join(f"c{i}" for i in range(49)) + "]"], "at most 48 classes"),
        (["lm_pretrain.copy_fraction=1.0"], r"lm_pretrain.copy_fraction must be in \[0, 1\), got 1.0"),
        (["lm_pretrain.copy_fraction=0.5"], "lm_pretrain.copy_fraction > 0 needs data.novel_classes"),
    ],
)
def test_bad_novel_mapping_settings_are_one_line_config_errors(tmp_path, digit_shards, overrides, message):
    """Novel-mapping and copy-text settings that cannot work fail at once, one line, nothing written."""
    with pytest.raises(ConfigError, match=message) as err:
        train_flamingo(str(digit_shards), tmp_path / "run", cfg_for(*overrides))
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_missing_vision_checkpoint_is_a_one_line_error(tmp_path, digit_shards):
    """A vision_checkpoint that does not exist, or does not fit the tower, fails at once with one line."""
    with pytest.raises(InputError, match="vision checkpoint not found: .*nope") as err:
        train_flamingo(str(digit_shards), tmp_path / "run", cfg_for(f"vision_checkpoint={tmp_path / 'nope'}"))
    assert "\n" not in str(err.value)
    torch.save({"visual.conv1.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="does not fit the vision model") as err:
        train_flamingo(str(digit_shards), tmp_path / "run", cfg_for(f"vision_checkpoint={tmp_path / 'other.pt'}"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ training (real Ray, DeepSpeed, MLflow)


def _metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _registered_step(out: Path) -> int:
    """The latest checkpoint Ray Train has registered (in its run snapshot), 0 if none yet."""
    for snap in out.glob("ray/*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
        except (json.JSONDecodeError, OSError):
            continue
        if latest:
            return int(latest["metrics"]["step"])
    return 0


def test_zero3_trains_logs_gates_and_evaluates(tmp_path, digit_shards, ray_local, mlflow_store):
    """ZeRO-3 on 2 workers, on an LM pretrained first on the shards' captions (and copy texts) and with media
    centering, a quarter of the sequences novel-mapping ones: loss goes down, gates are logged over time, the
    export is evaluated 0/2/4/8-shot by decoding and ranking and on the novel mapping, the k-shot curve and the
    prompt gallery go to MLflow."""
    overrides = [
        "lm_pretrain.steps=8",
        "lm_pretrain.seq_len=64",
        "lm_pretrain.copy_fraction=0.25",
        "model.center_media=true",
        "data.novel_fraction=0.25",
        "data.novel_classes=[zero,one,two,three,four,five,six,seven,eight,nine]",
    ]
    result = train_flamingo(str(digit_shards), tmp_path / "run", cfg_for("train.max_steps=16", *overrides))
    losses = _metric_history(mlflow_store, result["mlflow_run_id"], "loss")
    assert len(losses) == 8 and losses[-1][1] < losses[0][1] - 0.5, losses
    gates = _metric_history(mlflow_store, result["mlflow_run_id"], "gate_attn_l1")
    assert len(gates) == 8 and gates[-1][1] != 0.0
    assert result["steps"] == 16
    evals = result["eval"]
    # 16 steps on an LM pretrained for 8 learn the caption format, not yet the digit: k-shot accuracy is
    # at chance here (the tiny config needs ~600 + 600 steps; README), so only its presence is checked.
    assert {f"fewshot_{k}_{m}" for k in (0, 2, 4, 8) for m in ("acc", "rank_acc")} <= set(evals)
    assert {f"novel_{k}_acc" for k in (0, 2, 4, 8)} <= set(evals)
    import mlflow

    artifacts = {a.path for a in mlflow.MlflowClient(mlflow_store).list_artifacts(result["mlflow_run_id"])}
    assert {"kshot_accuracy.png", "novel_prompts.png", "fewshot_samples.txt"} <= artifacts
    lm_dir = tmp_path / "run" / "lm"
    assert (lm_dir / "_SUCCESS").is_file()
    assert json.loads((tmp_path / "run" / "model_config.json").read_text())["lm_name_or_path"] == str(lm_dir)
    assert _metric_history(mlflow_store, result["mlflow_run_id"], "lm_pretrain_loss_last")
    # The logged gates average the last window before its optimizer steps; the export has the final values.
    assert evals["gate_attn_l1"] != 0.0 and evals["gate_attn_l1"] == pytest.approx(gates[-1][1], abs=0.01)
    export = Path(result["export"])
    assert {"flamingo_model.safetensors", "flamingo_trainable.safetensors", "flamingo_config.json"} <= {
        p.name for p in export.iterdir()
    }


DRIVER = textwrap.dedent(
    """
    import sys
    from pipelines.train_flamingo import TrainFlamingoConfig, train_flamingo
    from vlm.config import load_config

    data, out, address, *overrides = sys.argv[1:]
    train_flamingo(data, out, load_config(TrainFlamingoConfig, None, overrides), address=address)
    """
)


def test_zero3_resume_after_kill_continues_in_the_same_mlflow_run(tmp_path, digit_shards, ray_local, mlflow_store):
    """ZeRO-3: kill the driver after a registered checkpoint; resume continues at that step in one MLflow run."""
    out = tmp_path / "run"
    args = [*TINY, "train.max_steps=12", "train.checkpoint_every=4", "eval.digits=false"]
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(digit_shards), str(out), address, *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and _registered_step(out) < 4 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    registered = _registered_step(out)
    assert 4 <= registered < 12, f"checkpoint at step {registered} (need one registered before the end)"
    first_run = json.loads((out / "train_state.json").read_text())["mlflow_run_id"]
    time.sleep(2)  # let Ray reap the dead job's workers before starting new ones

    result = train_flamingo(str(digit_shards), out, load_config(TrainFlamingoConfig, None, args), resume=True)
    assert result["mlflow_run_id"] == first_run and result["steps"] == 12
    resumed = _metric_history(mlflow_store, first_run, "resumed_from_step")
    assert resumed and resumed[-1][1] >= registered
    steps = [s for s, _ in _metric_history(mlflow_store, first_run, "loss")]
    assert steps[-1] == 12 and steps.count(12) == 1
