"""Corrupt samples met mid-stream by a training data pipeline: skipped, counted once, and reported.

Shards are checked up front (vlm.data.shard_check), but what is inside a member is only seen when
it is decoded: an image that does not decode, a `KEY.json` that does not parse. A training
preprocessor (`ClipPreprocess`, `BlipPreprocess`, `FlamingoPreprocess`) drops such a row and reports
it to the run's `SkipCounter`, a small Ray actor the trainer driver starts. The counter prints one
line per sample (shard and key), counts each (shard, key) once however many epochs meet it, and is
what the training loop reads for the `samples_skipped` metric and the `train.max_skipped_fraction`
limit; the driver reads it to end an over-limit run with one line.
"""

from __future__ import annotations

from collections.abc import Callable

# Errors a member's bytes can raise while decoding (PIL's UnidentifiedImageError is an OSError, a bad
# KEY.json's JSONDecodeError a ValueError; PIL raises SyntaxError for some broken PNG chunks).
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError)
KEPT_RECORDS = 20  # skipped samples remembered for the driver's message


class SkipCounter:
    """The run's count of skipped samples (a Ray actor: `skip_counter()` starts one)."""

    def __init__(self):
        self.seen: set[tuple[str, str]] = set()
        self.records: list[tuple[str, str, str]] = []

    def add(self, records: list[tuple[str, str, str]]) -> int:
        """Count (shard, key, reason) records not seen before; returns the total."""
        for shard, key, reason in records:
            if (shard, key) in self.seen:
                continue
            self.seen.add((shard, key))
            if len(self.records) < KEPT_RECORDS:
                self.records.append((shard, key, reason))
            print(f"skipped sample {key} of shard {shard}: {reason}", flush=True)
        return len(self.seen)

    def total(self) -> int:
        return len(self.seen)

    def first(self) -> list[tuple[str, str, str]]:
        return list(self.records)


def skip_counter():
    """A new `SkipCounter` actor of this driver (no CPU held; it lives as long as the driver)."""
    import ray

    return ray.remote(num_cpus=0)(SkipCounter).remote()


def over_limit_message(skips, limit: int, total_samples: int) -> str | None:
    """One line if the run's counter holds more than `limit` skipped samples, else None."""
    import ray

    skipped = int(ray.get(skips.total.remote()))
    if skipped <= limit:
        return None
    shard, key, reason = ray.get(skips.first.remote())[0]
    return (
        f"{skipped} of {total_samples} samples could not be decoded, more than train.max_skipped_fraction "
        f"allows ({limit}); first: sample {key} of shard {shard}: {reason}"
    )


def decode_rows(batch: dict, decode: Callable[[bytes, str | None, dict | None], object], skips=None) -> list:
    """`decode(image bytes, txt, parsed json)` of each row of a raw WebDataset batch, in order.

    A row without an image member, or one whose decoding raises one of `DECODE_ERRORS`, is left out
    and reported to `skips` (a `SkipCounter` handle; None: left out silently, as unit tests do).
    """
    from vlm.data.clip_data import row_fields

    out, bad = [], []
    for i in range(len(batch["__key__"])):
        try:
            data, txt, meta = row_fields(batch, i)
            if data is None:
                raise ValueError("no image member")
            out.append(decode(data, txt, meta))
        except DECODE_ERRORS as exc:
            shard = str(batch["__url__"][i]) if "__url__" in batch else "?"
            bad.append((shard, str(batch["__key__"][i]), f"{type(exc).__name__}: {exc}".splitlines()[0]))
    if bad and skips is not None:
        import ray

        ray.get(skips.add.remote(bad))  # waited for: the count is whole when the epoch ends
    return out
