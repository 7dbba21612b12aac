"""Flamingo around the causal LMs users bring: one tiny random LM per architecture, saved with
`save_pretrained` and given by path (`lm_name_or_path`), as a user's own LM directory would be.

For each: the LM replaces the preset's (config, counts, plan), zero gates leave its logits unchanged,
training steps move only the trainable parts, and the export reloads on its own for the k-shot eval.
Then the layouts that broke (OPT-350m's embedding narrower than the decoder, Gemma's scaled embedding),
LMs Flamingo cannot wrap, and one case through the real `vlm train flamingo` CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vlm.errors import ConfigError, InputError
from vlm.models.flamingo import build_flamingo, count_parameters, flamingo_preset
from vlm.models.flamingo.build import check_lm, export_flamingo, load_flamingo_export
from vlm.models.flamingo.tokenizer import offline_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VLM = Path(sys.executable).parent / "vlm"

# 2 layers, hidden 32 (64 for the projected OPT), vocab 512: the offline tokenizer's ~480 ids + Flamingo's 3 fit.
# Tying follows each architecture's default (GPT-2, OPT, Gemma, Bloom, MPT tie; Llama, Qwen2 do not).
_ATTN = {"num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256}
_GQA = {**_ATTN, "hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 2}
LMS: dict[str, dict] = {
    "llama": {"model_type": "llama", **_GQA},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 256},
    "opt": {"model_type": "opt", **_ATTN, "hidden_size": 32, "ffn_dim": 64, "word_embed_proj_dim": 32},
    # facebook/opt-350m's layout: embeddings narrower than the decoder (project_in / project_out), post-LN.
    "opt-350m-layout": {
        "model_type": "opt",
        **_ATTN,
        "hidden_size": 64,
        "ffn_dim": 64,
        "word_embed_proj_dim": 32,
        "do_layer_norm_before": False,
    },
    "qwen2": {"model_type": "qwen2", **_GQA},
    "qwen3": {"model_type": "qwen3", **_GQA, "head_dim": 8},
    "mistral": {"model_type": "mistral", **_GQA, "sliding_window": 16},
    "gpt_neox": {"model_type": "gpt_neox", **_ATTN, "hidden_size": 32, "intermediate_size": 64},
    "phi": {"model_type": "phi", **_ATTN, "hidden_size": 32, "intermediate_size": 64},
    "phi3": {"model_type": "phi3", **_GQA, "pad_token_id": 0},
    "gemma": {"model_type": "gemma", **_GQA, "head_dim": 8},
    "gemma2": {"model_type": "gemma2", **_GQA, "head_dim": 8, "sliding_window": 16},
    "falcon": {"model_type": "falcon", **_ATTN, "hidden_size": 32, "new_decoder_architecture": False},
    "mpt": {"model_type": "mpt", "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 256, "expansion_ratio": 2},
    "gptj": {"model_type": "gptj", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 4},
    "bloom": {"model_type": "bloom", "hidden_size": 32, "n_layer": 2, "n_head": 4},
}
COMMON = {"vocab_size": 512, "bos_token_id": 0, "eos_token_id": 0}
TEXT = "<image>Output: a handwritten seven<|endofchunk|><image>Output: the number two<|endofchunk|>"


pytestmark = pytest.mark.usefixtures("one_thread")


def save_lm(arch: str, path: Path, seed: int = 0) -> Path:
    """A random LM of `arch` plus the offline tokenizer, written as a user's LM directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**COMMON, **LMS[arch]}
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    lm.save_pretrained(str(path))
    offline_tokenizer().save_pretrained(str(path))
    return path


def around(lm_dir: Path):
    """(config, model, tokenizer): the tiny preset with its LM replaced by the one at `lm_dir`."""
    cfg = flamingo_preset("tiny", lm_name_or_path=str(lm_dir))
    torch.manual_seed(1)
    model, tok = build_flamingo(cfg)
    return cfg, model, tok


def batch(tok, rows: int = 2):
    ids = tok([TEXT] * rows, return_tensors="pt").input_ids  # (B, L), two <image> each
    return torch.randn(rows, 2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(2)), ids


def lm_params(lm: nn.Module) -> int:
    return sum(p.numel() for p in lm.parameters())  # parameters() yields a tied matrix once


# ------------------------------------------------------------------ the matrix, in process


@pytest.mark.parametrize("arch", LMS)
def test_lm_given_by_path_replaces_the_presets_lm(arch, tmp_path):
    """The preset's own lm_config is dropped; counts and the plan describe the LM in the directory."""
    from transformers import AutoModelForCausalLM

    from vlm.models.flamingo.plan import model_facts

    lm_dir = save_lm(arch, tmp_path / "lm")
    cfg = flamingo_preset("tiny", lm_name_or_path=str(lm_dir))
    assert cfg.lm_config is None
    check_lm(cfg)
    bare = AutoModelForCausalLM.from_pretrained(str(lm_dir))
    counts, shape = model_facts(cfg)
    assert counts["lm"] == lm_params(bare) == count_parameters(cfg)["lm"]
    assert shape.lm_hidden == bare.config.hidden_size and shape.lm_layers == 2


def test_vlm_plan_describes_the_lm_given_by_path(tmp_path, capsys):
    """`vlm plan flamingo --preset tiny lm_name_or_path=DIR` counts the directory's LM, not the preset's."""
    from pipelines.cli import main
    from vlm.models.flamingo.plan import plan_flamingo

    lm_dir = save_lm("opt-350m-layout", tmp_path / "lm")
    assert main(["plan", "flamingo", "--preset", "tiny", "--gpus-per-node", "2", f"lm_name_or_path={lm_dir}"]) == 0
    plan = plan_flamingo(flamingo_preset("tiny", lm_name_or_path=str(lm_dir)), 1, 2)[0]
    preset = plan_flamingo("tiny", 1, 2)[0]
    assert plan.frozen_params != preset.frozen_params
    out = capsys.readouterr().out
    assert f"{plan.trainable_params / 1e3:.2f}K trainable, {plan.frozen_params / 1e3:.2f}K frozen" in out, out


@pytest.mark.parametrize("arch", LMS)
def test_zero_gates_keep_the_lm_logits(arch, tmp_path):
    """With the gates at 0 (as built) Flamingo's logits are the bare LM's on the same embeddings."""
    from transformers import AutoModelForCausalLM

    lm_dir = save_lm(arch, tmp_path / "lm")
    _, model, tok = around(lm_dir)
    bare = AutoModelForCausalLM.from_pretrained(str(lm_dir)).eval()
    images, ids = batch(tok)
    num_base = model.lm.get_input_embeddings().num_base
    with torch.no_grad():
        got = model.eval()(images, ids)["logits"][..., :num_base]
        embeds = model.lm.get_input_embeddings()(ids)  # (B, L, D) with the added rows for <image> etc.
        want = bare(inputs_embeds=embeds, use_cache=False).logits[..., :num_base]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", LMS)
def test_training_steps_move_only_the_trainable_parts(arch, tmp_path):
    """Forward + backward: finite loss, gradients only on resampler / cross-attention / added rows, every
    gate gets a signal, and the frozen vision tower and LM are unchanged after optimizer steps."""
    _, model, tok = around(save_lm(arch, tmp_path / "lm"))
    images, ids = batch(tok)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("resampler.") or ".gated_xattn." in n or ".new." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        loss = model(images, ids, labels=ids)["loss"]
        assert torch.isfinite(loss), (step, loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
            gates = [layer.gated_xattn.attn_gate for layer in model.flamingo_layers()]
            assert len(gates) == 2 and all(float(g.grad.abs().sum()) > 0 for g in gates)
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("arch", LMS)
def test_gradient_checkpointing_gives_the_same_gradients(arch, tmp_path):
    """model.gradient_checkpointing (LM layers and cross-attention blocks recomputed) changes no gradient."""
    import dataclasses

    cfg, model, tok = around(save_lm(arch, tmp_path / "lm"))
    torch.manual_seed(1)
    checkpointed, _ = build_flamingo(dataclasses.replace(cfg, gradient_checkpointing=True))
    images, ids = batch(tok)
    grads = []
    for m in (model, checkpointed):
        with torch.no_grad():
            for layer in m.flamingo_layers():
                layer.gated_xattn.attn_gate.fill_(0.5)  # open, so the LM's gradients reach the resampler
        torch.manual_seed(3)  # the same dropout masks in both (recomputation replays the RNG state)
        m.train()(images, ids, labels=ids)["loss"].backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", LMS)
def test_export_reloads_without_the_lm_directory_and_runs_the_kshot_eval(arch, tmp_path):
    """The export carries the directory's LM config: it reloads strictly after the directory is gone, gives
    the same logits, and the few-shot digit eval runs on it."""
    from vlm.models.flamingo.eval import fewshot_digit_accuracy

    lm_dir = save_lm(arch, tmp_path / "lm")
    cfg, model, tok = around(lm_dir)
    with torch.no_grad():
        for layer in model.flamingo_layers():
            layer.gated_xattn.attn_gate.fill_(0.5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    export_flamingo(model.state_dict(), cfg, tok, tmp_path / "export", trainable=trainable)
    shutil.rmtree(lm_dir)
    exported = json.loads((tmp_path / "export" / "flamingo_config.json").read_text())["model"]["lm_config"]
    assert exported["model_type"] == LMS[arch]["model_type"]
    loaded, tok2 = load_flamingo_export(tmp_path / "export")
    images, ids = batch(tok2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids)["logits"], model.eval()(images, ids)["logits"])
    metrics = fewshot_digit_accuracy(
        loaded, tok2, shots=[0, 2], limit=2, stored_size=32, prompt="Output:", max_new_tokens=3
    )
    assert set(metrics) == {f"fewshot_{k}_{m}" for k in (0, 2) for m in ("acc", "rank_acc")}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


# ------------------------------------------------------------------ layouts that broke


def test_cross_attention_works_at_the_decoder_width_not_the_embedding_width(tmp_path):
    """OPT-350m's layout (embeddings 32 wide, decoder 64): the blocks are sized from the decoder."""
    _, model, _ = around(save_lm("opt-350m-layout", tmp_path / "lm"))
    assert model.lm.get_input_embeddings().embedding_dim == 32
    blocks = [layer.gated_xattn for layer in model.flamingo_layers()]
    assert blocks and all(b.attn.norm.normalized_shape == (64,) and b.attn.to_out.out_features == 64 for b in blocks)


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "llama"])
def test_added_rows_start_at_the_scale_of_the_lm_rows(arch, tmp_path):
    """Gemma's embedding multiplies rows by sqrt(hidden) in forward: the added rows come out at the scale of the
    pretrained rows, and (tied) their output-head rows at the scale of the head's."""
    _, model, _ = around(save_lm(arch, tmp_path / "lm"))
    emb = model.lm.get_input_embeddings()
    with torch.no_grad():
        base = emb(torch.arange(emb.num_base)).norm(dim=-1).mean()
        new = emb(torch.arange(emb.num_base, emb.num_base + emb.new.num_embeddings)).norm(dim=-1).mean()
        head = model.lm.get_output_embeddings()
        head_base = head.base.weight[: emb.num_base].norm(dim=-1).mean()
        head_new = head.new.weight.norm(dim=-1).mean()
    assert 0.7 < float(new / base) < 1.4, (float(new), float(base))
    assert 0.7 < float(head_new / head_base) < 1.4, (float(head_new), float(head_base))


def test_embedding_that_is_not_a_row_lookup_is_rejected():
    """Rows added beside an embedding that transforms its rows (beyond scaling) could not match: ValueError."""
    from vlm.models.flamingo.model import embedding_scale

    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 3.0

    assert embedding_scale(nn.Embedding(16, 8)) == 1.0
    assert embedding_scale(Scaled(16, 8)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="not a \\(scaled\\) row lookup"):
        embedding_scale(Shifted(16, 8))


# ------------------------------------------------------------------ LMs Flamingo cannot take


def test_preset_lm_fields_are_replaced_as_a_unit():
    """Giving one LM field drops the preset's other one; giving both keeps both."""
    assert flamingo_preset("tiny", lm_name_or_path="some/lm").lm_config is None
    assert flamingo_preset("flamingo-3b", lm_config={"model_type": "gpt2"}).lm_name_or_path is None
    both = flamingo_preset("tiny", lm_name_or_path="some/lm", lm_config={"model_type": "gpt2"})
    assert both.lm_name_or_path == "some/lm" and both.lm_config == {"model_type": "gpt2"}


def test_lm_without_known_decoder_layers_is_a_one_line_config_error(tmp_path):
    """A causal LM whose decoder layers are at no known path (Mamba: backbone.layers) is refused at build."""
    from transformers import AutoModelForCausalLM, MambaConfig

    lm = AutoModelForCausalLM.from_config(MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=512))
    lm.save_pretrained(str(tmp_path / "mamba"))
    offline_tokenizer().save_pretrained(str(tmp_path / "mamba"))
    with pytest.raises(ConfigError, match="cannot find the decoder layers of LM class MambaForCausalLM") as err:
        check_lm(flamingo_preset("tiny", lm_name_or_path=str(tmp_path / "mamba")))
    assert "\n" not in str(err.value)


def test_missing_or_unfit_lm_directory_is_a_one_line_error(tmp_path):
    """No directory at the path, a directory without a tokenizer, a vocab the LM cannot embed: one line each."""
    with pytest.raises(InputError, match="no LM directory at") as err:
        check_lm(flamingo_preset("tiny", lm_name_or_path=str(tmp_path / "nope")))
    assert "\n" not in str(err.value)
    lm_dir = save_lm("llama", tmp_path / "lm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (lm_dir / name).unlink()
    with pytest.raises(InputError, match="cannot load the tokenizer") as err:
        check_lm(flamingo_preset("tiny", lm_name_or_path=str(lm_dir)))
    assert "\n" not in str(err.value)
    small = dict(LMS["llama"], vocab_size=300)
    with pytest.raises(ConfigError, match=r"tokenizer has \d+ tokens but its embedding only 300 rows"):
        check_lm(flamingo_preset("tiny", lm_config=small))


# ------------------------------------------------------------------ through the CLI


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~2.5 min alone; several times that on a machine shared with other test runs
def test_cli_trains_flamingo_around_an_lm_directory(tmp_path, mlflow_store, clean_console):
    """`vlm train flamingo ... model.lm_name_or_path=DIR` (Qwen2) trains on 2 ZeRO-3 workers (the gates move),
    exports the directory's LM and reloads the export for the k-shot eval: exit 0."""
    from vlm.testbed.digit_shards import write_digit_shards

    write_digit_shards(tmp_path / "shards", 64, samples_per_shard=64, image_size=32)
    lm_dir = save_lm("qwen2", tmp_path / "lm")
    out = tmp_path / "run"
    args = [
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=1",
        "train.global_batch_size=4",
        "train.max_steps=3",  # warmup + cosine: step 1 runs at lr 0, step 2 at lr/2 (the last at 0)
        "train.log_every=1",
        "optim.lr=5e-3",
        "optim.warmup_steps=1",
        "data.images_per_sequence=2",
        "data.max_length=64",
        "eval.shots=[0,2]",
        "eval.limit=2",
        "eval.max_new_tokens=3",
        f"model.lm_name_or_path={lm_dir}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the command starts its own local Ray
    proc = subprocess.run(
        [str(VLM), "-q", "train", "flamingo", "--data", str(tmp_path / "shards"), "--output", str(out), *args],
        cwd=ROOT,
        env=dict(env, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=570,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fewshot_2_acc" in proc.stdout
    clean_console(proc.stdout + proc.stderr)
    model_cfg = json.loads((out / "model_config.json").read_text())
    assert model_cfg["lm_name_or_path"] == str(lm_dir) and model_cfg["lm_config"] is None
    export = json.loads(next(out.rglob("flamingo_config.json")).read_text())
    assert export["model"]["lm_config"]["model_type"] == "qwen2"
    evals = json.loads((out / "eval.json").read_text())
    assert evals["gate_attn_l1"] != 0.0 and {"fewshot_0_acc", "fewshot_2_rank_acc"} <= set(evals), evals


@pytest.mark.slow
def test_cli_refuses_an_lm_it_cannot_wrap_in_one_line(tmp_path):
    """An LM without known decoder layers is refused by the driver, before Ray: exit 2, one line, no output."""
    from transformers import AutoModelForCausalLM, MambaConfig

    lm = AutoModelForCausalLM.from_config(MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=512))
    lm.save_pretrained(str(tmp_path / "mamba"))
    offline_tokenizer().save_pretrained(str(tmp_path / "mamba"))
    from vlm.testbed.digit_shards import write_digit_shards

    write_digit_shards(tmp_path / "shards", 16, samples_per_shard=16, image_size=32)
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(VLM), "-q", "train", "flamingo", "--data", str(tmp_path / "shards"), "--output", str(out)]
        + [f"model.lm_name_or_path={tmp_path / 'mamba'}"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot find the decoder layers of LM class MambaForCausalLM" in lines[0], lines
    assert not out.exists()
