"""The config schema: defaults <- YAML <- dotted overrides, with one-line errors."""

from __future__ import annotations

import math

import pytest

from pipelines.ingest import IngestConfig
from vlm.config import ConfigError, load_config, parse_overrides, to_dict


def test_defaults_resolve():
    """No file and no overrides gives the dataclass defaults."""
    cfg = load_config(IngestConfig)
    assert cfg == IngestConfig()


def test_yaml_then_overrides(tmp_path):
    """Overrides win over the YAML file, which wins over defaults; types are coerced."""
    path = tmp_path / "c.yaml"
    path.write_text("download:\n  retries: 5\n  timeout_s: 3\nimage:\n  image_size: 128\n")
    cfg = load_config(IngestConfig, path, ["download.retries=1", "image.resize_mode=center_crop"])
    assert cfg.download.retries == 1
    assert cfg.download.timeout_s == 3.0 and isinstance(cfg.download.timeout_s, float)
    assert cfg.image.image_size == 128
    assert cfg.image.resize_mode == "center_crop"
    assert cfg.download.connections == IngestConfig().download.connections


def test_unknown_key_names_the_key():
    """A typo in a dotted key fails with the full dotted name."""
    with pytest.raises(ConfigError, match=r"unknown config key 'download\.retires'"):
        load_config(IngestConfig, None, ["download.retires=3"])


def test_wrong_type_names_the_key():
    """A value of the wrong type fails naming the key and the value."""
    with pytest.raises(ConfigError, match=r"'download\.retries' must be an integer, got 'many'"):
        load_config(IngestConfig, None, ["download.retries=many"])


def test_literal_choices_are_checked():
    """An enum-like field lists its choices."""
    with pytest.raises(ConfigError, match=r"'image\.resize_mode' must be one of"):
        load_config(IngestConfig, None, ["image.resize_mode=stretch"])


def test_missing_file_and_bad_yaml(tmp_path):
    """A missing or malformed config file is a one-line error naming the file."""
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(IngestConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("download: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(IngestConfig, bad)
    assert "\n" not in str(info.value)


def test_validate_hooks_run():
    """Field validation (not just types) runs on load."""
    with pytest.raises(ConfigError, match="samples_per_shard"):
        load_config(IngestConfig, None, ["output.samples_per_shard=0"])


def test_override_parsing():
    """Overrides parse YAML scalars and lists, and reject malformed items."""
    tree = parse_overrides(["a.b=1", "a.c=true", "d=[x, y]", "e=null"])
    assert tree == {"a": {"b": 1, "c": True}, "d": ["x", "y"], "e": None}
    assert load_config(IngestConfig, None, ["image.max_aspect_ratio=inf"]).image.max_aspect_ratio == math.inf
    assert load_config(IngestConfig, None, ["download.timeout_s=2e-1"]).download.timeout_s == 0.2
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_optional_and_lists():
    """Optional fields accept null; list fields check their items."""
    cfg = load_config(IngestConfig, None, ["input.caption_col=null", "download.disallowed_header_directives=[noai]"])
    assert cfg.input.caption_col is None
    assert cfg.download.disallowed_header_directives == ["noai"]
    assert to_dict(cfg)["input"]["caption_col"] is None


def test_overrides_keep_the_section_defaults_a_trainer_sets():
    # Flamingo's config gives its deepspeed/optim/train sections their own defaults; setting one
    # key of a section must keep the others (it once rebuilt the section from the class defaults:
    # `deepspeed.offload_optimizer=true` silently trained at ZeRO-2 instead of 3).
    from pipelines.train_blip import TrainBlipConfig
    from pipelines.train_flamingo import TrainFlamingoConfig

    base = load_config(TrainFlamingoConfig)
    overrides = ["deepspeed.offload_optimizer=true", "optim.lr=3e-4", "train.max_steps=5"]
    cfg = load_config(TrainFlamingoConfig, None, overrides)
    assert cfg.deepspeed.zero_stage == base.deepspeed.zero_stage == 3 and cfg.deepspeed.offload_optimizer
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == base.optim.weight_decay == 0.1
    assert cfg.train.max_steps == 5 and cfg.train.global_batch_size == base.train.global_batch_size == 8
    assert load_config(TrainFlamingoConfig, None, ["deepspeed.offload_params=true"]).deepspeed.offload_params
    assert load_config(TrainBlipConfig, None, ["optim.lr=1e-3"]).optim.warmup_steps == 50
