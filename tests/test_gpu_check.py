"""bench/gpu_check.py keeps working: its CPU dry run runs every row for real and reports sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def _open_clip_module():
    sys.path.insert(0, str(BENCH))
    try:
        import _open_clip
    finally:
        sys.path.remove(str(BENCH))
    return _open_clip


def test_open_clip_log_parsing_skips_warmup_windows():
    """open_clip_train's log windows after the warm-up give the step-weighted samples/s and data wait."""
    lines = [
        "Train Epoch: 0 [ 16/320 (5%)] Data (t): 0.200 Batch (t): 1.600, 10.0/s, 10.0/s/gpu LR: 0.1",
        "Train Epoch: 0 [ 96/320 (30%)] Data (t): 0.100 Batch (t): 0.500, 32.0/s, 32.0/s/gpu LR: 0.1",
        "Train Epoch: 0 [176/320 (55%)] Data (t): 0.000 Batch (t): 0.200, 80.0/s, 80.0/s/gpu LR: 0.1",
        "Train Epoch: 0 [256/320 (80%)] Data (t): 0.020 Batch (t): 0.100, 160.0/s, 160.0/s/gpu LR: 0.1",
    ]
    out = _open_clip_module().parse_log("\n".join(lines), batch=16, warmup_windows=1, log_every=5)
    # steps 1, 6, 11, 16: windows ending at 11 and 16 (5 steps each) are past the 5 warm-up steps
    assert out["measured_steps"] == 10
    assert out["samples_per_s"] == pytest.approx(10 * 16 / (5 * 0.2 + 5 * 0.1))
    assert out["data_wait_fraction"] == pytest.approx((5 * 0.02) / (5 * 0.2 + 5 * 0.1))


def test_open_clip_log_without_steps_is_an_error():
    """A run that logged no step is an error, not a zero rate."""
    with pytest.raises(RuntimeError, match="no training step"):
        _open_clip_module().parse_log("nothing here", batch=16, warmup_windows=1, log_every=5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_cpu_dry_run_reports_every_row(tmp_path):
    """`gpu_check.py --cpu-dry-run` runs CLIP (vlm and open_clip), Flamingo ZeRO-2/3, the plan, CapFilt, clipscore."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--cpu-dry-run", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "cpu"
    rows = res["rows"]
    assert set(rows) == {"clip", "flamingo", "plan", "capfilt", "clipscore"}

    clip = rows["clip"]
    assert clip["vlm"]["samples_per_s"] > 0 and clip["open_clip"]["samples_per_s"] > 0
    assert clip["vlm_over_open_clip"] == pytest.approx(
        clip["vlm"]["samples_per_s"] / clip["open_clip"]["samples_per_s"]
    )
    assert 0 <= clip["vlm"]["data_wait_fraction"] <= 1 and 0 <= clip["open_clip"]["data_wait_fraction"] <= 1
    assert clip["open_clip"]["measured_steps"] > 0

    stages = rows["flamingo"]["stages"]
    assert set(stages) == {"2", "3"}
    for r in stages.values():
        assert r["tokens_per_s"] > 0 and r["model_flops_per_step"] > 0
        assert r["mfu"] is None  # no bf16 peak on a CPU
        assert r["last_loss"] == r["last_loss"]  # not NaN
        assert r["params"]["trainable"] > 0 and r["params"]["xattn"] > 0

    for stage, p in rows["plan"].items():
        assert stage in stages
        assert p["predicted_bytes"] > 0 and p["measured_bytes"] > 0

    capfilt = rows["capfilt"]
    assert capfilt["batched"]["images_per_s"] > 0 and capfilt["image_by_image"]["images_per_s"] > 0
    assert capfilt["batched_over_image_by_image"] > 1  # batching helps even on a CPU
    assert rows["clipscore"]["images_per_s"] > 0
    assert "GPU check (cpu)" in res["table"] and "GPU check (cpu)" in proc.stdout
