"""Launch open_clip's own trainer (`python -m open_clip_train.main`) on vlm's shards, for comparison.

    python bench/_open_clip.py OPEN_CLIP_TRAIN_ARGS...

Two things it adds before handing its arguments to `open_clip_train.main.main`, both needed to run
the same model on the same data as `vlm train clip`:
* vlm's CLIP presets (`vlm-clip-tiny`, ...) are registered with open_clip, so `--model` can name them;
* webdataset >= 0.2.100 ends every shard with an end-of-shard marker (an empty dict) that
  open_clip_train 3.3.0's `group_by_keys_nothrow` does not skip (KeyError: 'fname'), so its tar
  expander is called with `eof_value=None` (no marker), as webdataset < 0.2.100 behaved.
`parse_log` reads the samples/s of the log windows back from open_clip's log lines.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# "Train Epoch: 0 [ 160/320 (50%)] Data (t): 0.001 Batch (t): 0.123, 130.1/s, 130.1/s/gpu LR: ..."
_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),")


def parse_log(text: str, batch: int, warmup_windows: int, log_every: int) -> dict:
    """Overall samples/s and data-wait fraction of open_clip's log windows after `warmup_windows`.

    open_clip logs at steps 1, 1 + log_every, ...: each line's `Batch (t)` is the mean step time
    (data wait included) and `Data (t)` the mean data wait over the steps since the previous line.
    """
    windows = [(int(n) // batch, float(d), float(b)) for n, d, b in _LINE.findall(text)]
    if len(windows) < 2:
        raise RuntimeError("open_clip_train logged no training step past its first (see its log above)")
    # (steps in the window, its last step, data wait, step time); a window is measured when it starts
    # after the warm-up steps, as vlm's windows are.
    pairs = [(cur[0] - prev[0], *cur) for prev, cur in zip(windows, windows[1:])]
    warm = warmup_windows * log_every + 1
    steady = [w for w in pairs if w[1] - w[0] >= warm] or pairs
    steps = sum(n for n, *_ in steady)
    time_s = sum(n * bt for n, _, _, bt in steady)
    wait_s = sum(n * dt for n, _, dt, _ in steady)
    return {
        "measured_steps": steps,
        "samples_per_s": steps * batch / time_s,
        "data_wait_fraction": wait_s / time_s,
        "window_samples_per_s": [round(batch / bt, 1) for _, _, bt in windows],
    }


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    import open_clip_train.data
    import webdataset.tariterators

    from vlm.models.clip.build import register_presets

    register_presets()
    open_clip_train.data.tar_file_expander = functools.partial(
        webdataset.tariterators.tar_file_expander, eof_value=None
    )
    from open_clip_train.main import main as open_clip_main

    open_clip_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
