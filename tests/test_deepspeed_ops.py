"""DeepSpeed's CPU comm op is built once per environment (make setup), never by a later run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OP_DIR = Path(sys.prefix) / "torch_extensions" / "deepspeed_shm_comm"


def _build_ops(cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    cmd = [sys.executable, "-m", "vlm.runtime", "build-ops"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=800)


def _state() -> tuple[str, float]:
    return (OP_DIR / ".ninja_log").read_text(), (OP_DIR / "deepspeed_shm_comm.so").stat().st_mtime


def test_second_process_compiles_nothing(tmp_path):
    import torch

    if torch.cuda.is_available() or sys.platform != "linux":
        pytest.skip("the shared-memory comm op is only used on CPU-only Linux")
    first = _build_ops(tmp_path)  # builds only if make setup did not (a hand-made venv)
    assert first.returncode == 0, first.stderr[-2000:]
    assert str(OP_DIR.parent) in first.stdout
    before = _state()
    (tmp_path / "elsewhere").mkdir()
    again = _build_ops(tmp_path / "elsewhere")  # another process, another cwd: a training worker
    assert again.returncode == 0, again.stderr[-2000:]
    assert _state() == before, "the op was rebuilt"
