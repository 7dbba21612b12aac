"""Scale of the global decisions (issue 18): driver memory and time of the distributed jobs at 1M-10M records.

Ingest's duplicate URLs, clean's exact + near duplicates and a top-fraction selection are global
decisions: every row may depend on every earlier one. They run as Ray jobs over hash exchanges
(`vlm.data.exchange`), so the driver should hold object refs only and its memory should stay flat
as the data grows. This benchmark measures that on synthetic feature records (no images), made
INSIDE Ray tasks, one block per task, so the driver never holds them either:

* id, key, sha256 and source_sha256 (hex), a 64-bit pHash (hex), a CLIP-like score, a URL digest;
* planted duplicates at known rates (default 5% exact: same digests, pHash and URL of an earlier
  base record; 5% near: an earlier base record's pHash with 1-4 bits flipped, own digests).

For each size, in a fresh process with its own local Ray (`vlm.runtime.init_ray`), it times
(a) `first_occurrence` on the URL digest (ingest's exact dedup), (b) `dedup_decisions` (clean's
exact + near dedup) and (c) the top-fraction selection of `vlm.data.quantile`, each with the
driver's peak RSS (psutil, sampled in a thread) and the recall of the planted duplicates. Up to
--oracle-max records it also checks the decisions against one driver walking every record:
a first-occurrence set for (a), `vlm.data.cleaning.Dedup.decide` for (b), a sort by (score, id)
for (c).

    python bench/scale.py                            # 1M, 4M, 10M records
    python bench/scale.py --quick                    # 100k and 400k records, oracle on both
    python bench/scale.py --sizes 1000000,4000000 --oracle-max 200000

Prints a table and writes `bench/results/scale.json`. Goals: driver peak RSS <= 1 GiB at every
size, and time(largest) / time(smallest) <= 1.2 x the size ratio (12x for 10M over 1M).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from _common import RESULTS, machine_info, report, text_table

from vlm.data import exchange

DEFAULT_JSON = RESULTS / "scale.json"
PACKAGES = ("ray", "numpy", "pyarrow", "psutil")
RSS_GOAL_MB = 1024
BASE, EXACT, NEAR = 0, 1, 2  # what a record was planted as

# ----------------------------------------------------------------------------- synthetic records (Ray tasks)


def _h(seed: int, ids: np.ndarray, k: int) -> np.ndarray:
    """Independent 64-bit hashes of record ids (stream k): every feature is a pure function of the id."""
    return exchange.mix64(
        (ids.astype(np.uint64) << np.uint64(8)) + np.uint64(k) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    )


def kinds(ids: np.ndarray, seed: int, exact: float, near: float) -> np.ndarray:
    """BASE, EXACT or NEAR per id (record 0 is always a base record)."""
    u = (_h(seed, ids, 1) >> np.uint64(11)).astype(np.float64) / 2.0**53
    kind = np.where(u < exact, EXACT, np.where(u < exact + near, NEAR, BASE)).astype(np.int8)
    kind[ids == 0] = BASE
    return kind


def _roots(ids: np.ndarray, kind: np.ndarray, seed: int, exact: float, near: float) -> np.ndarray:
    """The earlier base record each planted duplicate copies (itself for a base record)."""
    root = ids.copy()
    todo = np.flatnonzero(kind != BASE)
    for attempt in range(64):  # 90% of records are base: a try finds one; 64 misses leave record 0
        if todo.size == 0:
            break
        cand = (_h(seed, ids[todo], 64 + attempt) % ids[todo].astype(np.uint64)).astype(np.int64)
        ok = kinds(cand, seed, exact, near) == BASE
        root[todo[ok]] = cand[ok]
        todo = todo[~ok]
    root[todo] = 0
    return root


def _hex(words: np.ndarray) -> pa.Array:
    """Rows of uint64 words as one lowercase hex string each, built from buffers (no Python loop)."""
    n, width = words.shape[0], 16 * words.shape[1]
    data = words.astype(">u8").tobytes().hex().encode()
    offsets = np.arange(0, width * (n + 1), width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def flip_mask(ids: np.ndarray, seed: int) -> np.ndarray:
    """1-4 distinct bits per id: positions a + b*t (mod 64), b odd, t < k."""
    k = (_h(seed, ids, 2) % np.uint64(4)).astype(np.int64) + 1
    a = (_h(seed, ids, 3) % np.uint64(64)).astype(np.int64)
    b = 2 * (_h(seed, ids, 4) % np.uint64(32)).astype(np.int64) + 1
    mask = np.zeros(len(ids), dtype=np.uint64)
    for t in range(4):
        bit = np.left_shift(np.uint64(1), ((a + b * t) % 64).astype(np.uint64))
        mask |= np.where(t < k, bit, np.uint64(0))
    return mask


def make_block(index: int, rows: int, n: int, seed: int, exact: float, near: float) -> tuple:
    """Block `index` of the records: (feature table, URL table for first_occurrence, planted counts)."""
    ids = np.arange(index * rows, min(n, (index + 1) * rows), dtype=np.int64)
    kind = kinds(ids, seed, exact, near)
    root = _roots(ids, kind, seed, exact, near)
    same = np.where(kind == EXACT, root, ids)  # whose digests a record carries
    sha = np.stack([_h(seed, same, 16 + w) for w in range(4)], axis=1)
    source = np.stack([_h(seed, same, 20 + w) for w in range(4)], axis=1)
    phash = _h(seed, np.where(kind == BASE, ids, root), 24) ^ np.where(kind == NEAR, flip_mask(ids, seed), np.uint64(0))
    url = _h(seed, same, 25)
    score = 0.15 + 0.2 * (_h(seed, ids, 26) >> np.uint64(11)).astype(np.float64) / 2.0**53
    id_col = pa.array(ids)
    features = pa.table(
        {
            "id": id_col,
            "key": pc.utf8_lpad(pc.cast(id_col, pa.string()), 10, "0"),
            "sha256": _hex(sha),
            "source_sha256": _hex(source),
            "phash": _hex(phash[:, None]),
            "clip_score": pa.array(score.astype(np.float32)),
        }
    )
    urls = pa.table({"digest": pa.array(url), "order": id_col})
    counts = {"rows": len(ids), "exact": int((kind == EXACT).sum()), "near": int((kind == NEAR).sum())}
    return features, urls, counts


# ----------------------------------------------------------------------------- summaries (Ray tasks)


def _url_found(later: pa.Table, seed: int, exact: float, near: float) -> dict:
    """Rows (a) marked, and how many of them were planted exact duplicates."""
    kind = kinds(later.column("order").to_numpy(), seed, exact, near)
    return {"found": later.num_rows, "planted_found": int((kind == EXACT).sum())}


def _dedup_found(decision, block: pa.Table, seed: int, exact: float, near: float) -> dict:
    """Rows (b) dropped, by planted kind (a reason column: null keeps the row)."""
    dropped = _dropped(decision, block)
    kind = kinds(block.column("id").to_numpy()[dropped], seed, exact, near)
    return {
        "found": int(dropped.sum()),
        "exact_found": int((kind == EXACT).sum()),
        "near_found": int((kind == NEAR).sum()),
    }


def _dropped(decision: pa.Table, block: pa.Table) -> np.ndarray:
    """Boolean mask of the rows of `block` that a `dedup_decisions` result (aligned with it) drops."""
    return decision.column("reason").is_valid().to_numpy(zero_copy_only=False)


def _selected(marked: pa.Table) -> int:
    """How many rows a `quantile.top_fraction` result keeps."""
    return int(marked.column("keep").to_numpy(zero_copy_only=False).sum())


# ----------------------------------------------------------------------------- one size (a fresh process)


class PeakRss:
    """The driver's peak RSS over a phase, sampled every 20 ms in a thread."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def reset(self) -> int:
        self.peak = self.proc.memory_info().rss
        return self.peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _timed(rss: PeakRss, fn) -> dict:
    start_mb = rss.reset() / 2**20
    t0 = time.perf_counter()
    value = fn()
    wall = time.perf_counter() - t0
    rss.peak = max(rss.peak, rss.proc.memory_info().rss)
    return {"wall_s": round(wall, 2), "rss_start_mb": round(start_mb), "rss_peak_mb": round(rss.peak / 2**20)} | value


def _sum(dicts: list[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _warm_up(cpus: int, plant: tuple) -> None:
    """Start every worker and import the jobs' modules in them before anything is timed."""
    import ray

    from vlm.data.global_dedup import first_occurrence

    refs = exchange.run_tasks(make_block, range(cpus), 1000, 1000 * cpus, *plant, num_returns=3)
    ray.get(first_occurrence([r[1] for r in refs], digest="digest", order="order", partitions=cpus))


def run_size(n: int, opts: dict) -> dict:
    """Every job on `n` records in this process; the figures of each."""
    import ray

    from vlm.data.cleaning import DedupConfig
    from vlm.data.global_dedup import first_occurrence
    from vlm.runtime import cluster_cpus, init_ray

    init_ray(num_cpus=opts["cpus"], dashboard=False)
    cpus = cluster_cpus()
    rows = opts["block_rows"]
    partitions = opts["partitions"] or max(cpus, math.ceil(n / opts["partition_rows"]))
    plant = (opts["seed"], opts["exact"], opts["near"])
    _warm_up(cpus, plant)
    rss = PeakRss()
    result: dict = {"records": n, "blocks": math.ceil(n / rows), "partitions": partitions, "cpus": cpus}
    made: dict = {}

    def generate() -> dict:
        refs = exchange.run_tasks(make_block, range(math.ceil(n / rows)), rows, n, *plant, num_returns=3)
        made["features"], made["urls"] = [r[0] for r in refs], [r[1] for r in refs]
        return {"planted": _sum(ray.get([r[2] for r in refs]))}

    result["generate"] = _timed(rss, generate)
    planted = result["generate"]["planted"]

    def url_dedup() -> dict:
        made["later"] = first_occurrence(made["urls"], digest="digest", order="order", partitions=partitions)
        found = _sum(ray.get(exchange.run_tasks(_url_found, made["later"], *plant)))
        return found | {"recall": round(found["planted_found"] / max(planted["exact"], 1), 6)}

    result["first_occurrence"] = _timed(rss, url_dedup)

    from vlm.data.global_dedup import dedup_decisions

    def dedup() -> dict:
        made["decisions"] = dedup_decisions(made["features"], DedupConfig(), partitions=partitions)
        found = _sum(
            ray.get(
                [ray.remote(_dedup_found).remote(d, b, *plant) for d, b in zip(made["decisions"], made["features"])]
            )
        )
        return found | {
            "exact_recall": round(found["exact_found"] / max(planted["exact"], 1), 6),
            "near_recall": round(found["near_found"] / max(planted["near"], 1), 6),
        }

    result["dedup_decisions"] = _timed(rss, dedup)
    result["top_fraction"] = _top_fraction(rss, made, partitions, opts)
    if n <= opts["oracle_max"]:
        result["oracle"] = _oracle(n, opts, made)
    rss.close()
    return result


def _top_fraction(rss: PeakRss, made: dict, partitions: int, opts: dict) -> dict:
    """(c): the exact top-fraction selection of vlm.data.quantile."""
    import ray

    from vlm.data import quantile

    def run() -> dict:
        made["top"] = quantile.top_fraction(made["features"], "clip_score", opts["fraction"], partitions=partitions)
        return {"selected": sum(ray.get(exchange.run_tasks(_selected, made["top"])))}

    return _timed(rss, run)


def _oracle(n: int, opts: dict, made: dict) -> dict:
    """The distributed decisions against one driver walking every record (after the timings)."""
    import ray

    from vlm.data.cleaning import Dedup, DedupConfig

    plant = (opts["seed"], opts["exact"], opts["near"])
    blocks = [make_block(i, opts["block_rows"], n, *plant) for i in range(math.ceil(n / opts["block_rows"]))]
    digests = np.concatenate([u.column("digest").to_numpy() for _, u, _ in blocks])
    _, first = np.unique(digests, return_index=True)
    expected = np.ones(n, dtype=bool)
    expected[first] = False
    got = np.zeros(n, dtype=bool)
    for later in ray.get(made["later"]):
        got[later.column("order").to_numpy()] = True
    out = {"first_occurrence_equal": bool((got == expected).all())}
    if "decisions" in made:
        t0 = time.perf_counter()
        records = [
            {"key": k, "dedup": {"sha256": s, "source_sha256": src, "phash": p}}
            for f, _, _ in blocks
            for k, s, src, p in zip(*(f.column(c).to_pylist() for c in ("key", "sha256", "source_sha256", "phash")))
        ]
        walk = np.array([r is not None for r in Dedup(DedupConfig()).decide(records)])
        dist = np.concatenate([_dropped(d, f) for d, (f, _, _) in zip(ray.get(made["decisions"]), blocks)])
        out |= {"dedup_equal": bool((walk == dist).all()), "dedup_mismatches": int((walk != dist).sum())}
        out["walk_s"] = round(time.perf_counter() - t0, 1)
    scores = np.concatenate([f.column("clip_score").to_numpy().astype(np.float64) for f, _, _ in blocks])
    best = np.lexsort((np.arange(n), -scores))[: round(opts["fraction"] * n)]  # by score, ties: earlier id
    want = np.zeros(n, dtype=bool)
    want[best] = True
    kept = np.concatenate([t.column("keep").to_numpy(zero_copy_only=False) for t in ray.get(made["top"])])
    out["top_fraction_equal"] = bool((kept == want).all())
    return out


# ----------------------------------------------------------------------------- the table


def _row(r: dict, job: str) -> tuple[str, ...]:
    f = r.get(job)
    if not f or "wall_s" not in f:
        return (f"{r['records']:,}", job, "-", "-", "-", (f or {}).get("skipped", "not available"))
    if job == "first_occurrence":
        check = f"recall {f['recall']:.4f}, found {f['found']:,}"
    elif job == "dedup_decisions":
        check = f"recall exact {f['exact_recall']:.4f} near {f['near_recall']:.4f}, dropped {f['found']:,}"
    elif job == "top_fraction":
        check = f"selected {f['selected']:,}"
    else:
        check = f"planted {f['planted']['exact']:,} exact, {f['planted']['near']:,} near"
    oracle = r.get("oracle", {})
    flag = {
        "first_occurrence": "first_occurrence_equal",
        "dedup_decisions": "dedup_equal",
        "top_fraction": "top_fraction_equal",
    }.get(job)
    if flag in oracle:
        check += ", = driver walk" if oracle[flag] else ", DIFFERS from driver walk"
    rate = r["records"] / f["wall_s"] / 1e3 if f["wall_s"] else float("nan")
    return (f"{r['records']:,}", job, f"{f['wall_s']:.1f}", f"{rate:.0f}", f"{f['rss_peak_mb']}", check)


def render(results: list[dict]) -> tuple[str, dict]:
    jobs = ("generate", "first_occurrence", "dedup_decisions", "top_fraction")
    rows = [("records", "job", "wall s", "k rec/s", "driver peak MB", "check")]
    rows += [_row(r, job) for r in results for job in jobs]
    lines = text_table(rows, left=2)
    goals: dict = {"rss_goal_mb": RSS_GOAL_MB}
    peaks = [r[j]["rss_peak_mb"] for r in results for j in jobs if r.get(j) and "rss_peak_mb" in r[j]]
    goals["max_driver_peak_mb"] = max(peaks) if peaks else None
    goals["rss_met"] = bool(peaks) and max(peaks) <= RSS_GOAL_MB
    lo, hi = results[0], results[-1]
    for job in jobs[1:]:
        if len(results) > 1 and (lo.get(job) or {}).get("wall_s") and (hi.get(job) or {}).get("wall_s"):
            ratio, size = hi[job]["wall_s"] / lo[job]["wall_s"], hi["records"] / lo["records"]
            goals[f"{job}_time_ratio"] = round(ratio, 2)
            goals[f"{job}_ratio_met"] = ratio <= 1.2 * size
            lines.append(
                f"{job}: {hi['records']:,} / {lo['records']:,} records took {ratio:.1f}x (goal <= {1.2 * size:.0f}x)"
            )
    lines.append(f"driver peak RSS: max {goals['max_driver_peak_mb']} MB (goal <= {RSS_GOAL_MB} MB)")
    return "\n".join(lines), goals


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000000,4000000,10000000", help="records per run, comma-separated")
    p.add_argument("--quick", action="store_true", help="100k and 400k records (oracle on both)")
    p.add_argument("--block-rows", type=int, default=250_000, help="records per generated block (Ray task)")
    p.add_argument("--partitions", type=int, default=0, help="reduce tasks (0: max(CPUs, records / --partition-rows))")
    p.add_argument("--partition-rows", type=int, default=1_000_000)
    p.add_argument("--cpus", type=int, default=None, help="local Ray's logical CPUs (default: init_ray's)")
    p.add_argument("--exact", type=float, default=0.05, help="planted exact-duplicate rate")
    p.add_argument("--near", type=float, default=0.05, help="planted near-duplicate rate (1-4 bits)")
    p.add_argument("--fraction", type=float, default=0.3, help="top fraction selected by clip_score")
    p.add_argument("--oracle-max", type=int, default=1_000_000, help="largest size checked against a driver walk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one size, options as JSON
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.block_rows, args.oracle_max = "100000,400000", 50_000, 400_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        Path(job["out"]).write_text(json.dumps(run_size(job["n"], job["opts"])))
        return 0
    opts = {
        k: getattr(args, k)
        for k in (
            "block_rows",
            "partitions",
            "partition_rows",
            "cpus",
            "exact",
            "near",
            "fraction",
            "oracle_max",
            "seed",
        )
    }
    sizes = [int(s) for s in args.sizes.split(",")]
    t0, results = time.time(), []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            out = Path(tmp) / f"{n}.json"
            print(f"{n:,} records ...", flush=True)
            child = json.dumps({"n": n, "opts": opts, "out": str(out)})
            subprocess.run([sys.executable, __file__, "--child", child], check=True)
            results.append(json.loads(out.read_text()))
    text, goals = render(results)
    result = {
        "benchmark": "scale",
        "sizes": sizes,
        "options": opts,
        "results": results,
        "goals": goals,
        "total_wall_s": round(time.time() - t0, 1),
        "machine": machine_info(PACKAGES),
    }
    report(args.json, result, text, result["total_wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
