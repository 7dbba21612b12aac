"""README.md and docs/ stay true: links resolve, the README stays short, every `vlm` command in them
parses with the real CLI and config schema, and every config key is documented."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 300

# The config schema of each command that takes --config, as `module:Class`.
CONFIGS = {
    ("ingest",): "pipelines.ingest:IngestConfig",
    ("clean",): "pipelines.clean:CleanConfig",
    ("capfilt",): "pipelines.capfilt:CapfiltConfig",
    ("train", "clip"): "pipelines.train_clip:TrainClipConfig",
    ("train", "blip"): "pipelines.train_blip:TrainBlipConfig",
    ("train", "flamingo"): "pipelines.train_flamingo:TrainFlamingoConfig",
}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_INLINE = re.compile(r"`([^`]+)`")


def _load(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _fenced(text: str, lang: str | None = None) -> list[str]:
    return [body for tag, body in _FENCE.findall(text) if lang is None or tag == lang]


def _prose(text: str) -> str:
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _commands(block: str) -> list[list[str]]:
    """The command lines of a bash block, split at `&&`, `;`, `|` and a trailing `&`."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, ";"]:
            if word in ("&&", ";", "&", "|", "||"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def _vlm_commands(page: Path) -> list[list[str]]:
    """Every `vlm ...` command in the page's bash blocks, and those submitted after `--`."""
    found = []
    for block in _fenced(page.read_text(), "bash"):
        for words in _commands(block):
            if words[:1] != ["vlm"]:
                continue
            found.append(words[1:])
            if "--" in words and words[words.index("--") + 1 : words.index("--") + 2] == ["vlm"]:
                found.append(words[words.index("--") + 2 :])
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse as `vlm` does: trailing key=value overrides may follow options."""
    from pipelines.cli import build_parser

    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"`vlm {shlex.join(argv)}` does not parse")
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    assert not bad and (not extra or hasattr(args, "overrides")), f"`vlm {shlex.join(argv)}`: unknown {extra}"
    args.overrides = [*(getattr(args, "overrides", None) or []), *extra]
    return args


def _check_command(argv: list[str]) -> None:
    """The command parses, its config file exists and its config + overrides resolve."""
    from vlm.config import load_config

    args = _parse(argv)
    key = (args.command, args.model) if args.command == "train" else (args.command,)
    if key in CONFIGS:
        config = ROOT / args.config if args.config else None
        overrides = list(args.overrides)
        if key == ("train", "blip"):
            overrides.append(f"task={args.task}")
        load_config(_load(CONFIGS[key]), config, overrides)
    elif args.command == "pipeline":
        from pipelines.runner import load_pipeline

        load_pipeline(ROOT / args.file, args.overrides)


def test_relative_links_resolve():
    """Every relative link in README.md and docs/*.md points at an existing file (and heading)."""
    broken = []
    for page in PAGES:
        for target in _LINK.findall(_prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_a_short_page():
    """The README stays a newcomer's page; the reference lives in docs/."""
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (max {README_MAX_LINES})"
    top = "\n".join(lines[:40])
    assert "make demo" in top and "make test" in top, "the two commands come first"


def test_readme_links_every_docs_page():
    """Each docs page is reachable from the README."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _LINK.findall(README.read_text())}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_documented_vlm_commands_parse(page):
    """Every `vlm` command in a page's bash blocks parses, and its --config and overrides resolve."""
    commands = _vlm_commands(page)
    if page == README:
        assert len(commands) >= 10
    for argv in commands:
        _check_command(argv)


def test_vlm_subcommands_named_in_readme_exist():
    """Every `vlm <subcommand>` the README names in code, inline or in a block, is in the CLI parser."""
    from pipelines.cli import build_parser

    text = README.read_text()
    named = [shlex.split(span) for span in _INLINE.findall(_prose(text).replace("\n", " ")) if span.startswith("vlm ")]
    named += [["vlm", *argv] for argv in _vlm_commands(README)]
    assert len(named) > 10
    for words in named:
        parser, path = build_parser(), ["vlm"]
        for word in words[1:]:
            choices = _subparsers(parser)
            if not choices or word.startswith("-") or word.isupper():
                break
            assert word in choices, f"`{' '.join(words)}`: no subcommand {' '.join([*path, word])!r}"
            parser, path = choices[word], [*path, word]


def test_make_targets_in_docs_exist():
    """`make X` in the README and docs names a Makefile target."""
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for page in PAGES:
        for block in _fenced(page.read_text(), "bash"):
            for words in _commands(block):
                if words[:1] == ["make"]:
                    assert set(words[1:]) <= targets, f"{page.name}: `{' '.join(words)}`"


def test_demo_outputs_named_in_docs_are_demo_stages():
    """`demo_out/<name>` in a documented command is a stage of the demo pipeline, so it exists after make demo."""
    stages = set(yaml.safe_load((ROOT / "configs/pipelines/demo.yaml").read_text())["stages"])
    for page in PAGES:
        for argv in _vlm_commands(page):
            for name in re.findall(r"demo_out/([\w.-]+)", " ".join(argv)):
                assert name in stages, f"{page.name}: `vlm {shlex.join(argv)}`: demo_out/{name} is no demo stage"


def _architecture_paths() -> list[str]:
    """The paths of the README's architecture map (the tree block under "## Architecture")."""
    section = README.read_text().split("\n## Architecture", 1)[1]
    tree = _fenced(section)[0]
    paths, stack = [], []
    for line in tree.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        stack = [*stack[:depth], name.rstrip("/")]
        paths.append("/".join(stack) + ("/" if name.endswith("/") else ""))
    return paths


def test_architecture_map_names_existing_paths():
    """Every file and directory in the README's architecture map exists."""
    paths = _architecture_paths()
    assert {"vlm/", "pipelines/", "pipelines/cli.py"} <= set(paths)
    missing = [p for p in paths if not (ROOT / p).exists() or (p.endswith("/") != (ROOT / p).is_dir())]
    assert not missing, f"README architecture map names paths that are not there: {missing}"


def test_pipeline_kinds_and_params_are_documented():
    """docs/pipelines.md names every stage kind a pipeline file can use and each kind's params."""
    from pipelines.stages import KINDS

    text = (ROOT / "docs" / "pipelines.md").read_text()
    missing = [kind for kind in KINDS if f"`{kind}`" not in text]
    for kind, spec in KINDS.items():
        params = getattr(spec, "params_cls", None)
        if params is not None and dataclasses.is_dataclass(params):
            missing += [f"{kind}.params.{f.name}" for f in dataclasses.fields(params) if f"`{f.name}`" not in text]
    assert not missing, f"undocumented in docs/pipelines.md: {missing}"


def _keys(cls, prefix: str = ""):
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _keys(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_config_key_is_documented():
    """docs/configuration.md names every key of every command's config schema."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    keys = {(" ".join(cmd), key) for cmd, spec in CONFIGS.items() for key in _keys(_load(spec))}
    missing = sorted(f"{cmd}: {key}" for cmd, key in keys if f"`{key}`" not in text)
    assert not missing, "undocumented config keys:\n" + "\n".join(missing)
