"""The table of benches/scale.sh: each tool's phases, wall time, peak memory and
adjusted Rand index against the planted groups, shoal's labels with one worker
against several, and the targets. Exit status 1 when a target is missed.

Reads target/bench-out/scale/<size>/: the shoal outputs (report.json,
assignments.parquet/, trusted only with their _SUCCESS), the /usr/bin/time
figures ("<seconds> <peak KB>") of every process, the peer's JSON line, and the
log's truth table.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
from sklearn.metrics import adjusted_rand_score

GIB = 1024**3


def timing(path: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS bytes) of a /usr/bin/time -f "%e %M" file."""
    seconds, kb = path.read_text().split()[-2:]
    return float(seconds), float(kb) * 1024


def assignments(out: Path):
    if not (out / "_SUCCESS").exists():
        sys.exit(f"{out} has no _SUCCESS: the run did not finish")
    t = ds.dataset(out / "assignments.parquet", format="parquet").to_table(columns=["user_id", "segment"])
    return t.column("user_id").to_numpy(zero_copy_only=False), t.column("segment").to_numpy()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--size", required=True)
    args = ap.parse_args()
    base = args.base

    truth = ds.dataset(base / "data" / "truth.parquet", format="parquet").to_table().to_pandas()
    group = dict(zip(truth["user_id"].to_numpy(), truth["group"].to_numpy()))

    def ari(users, labels) -> float:
        planted = np.array([group[int(u)] for u in users])
        return float(adjusted_rand_score(planted, labels))

    rows = []
    misses = []
    one_users, one_labels = assignments(base / "shoal-1")
    report = json.loads((base / "shoal-1" / "report.json").read_text())
    wall1, rss1 = timing(base / "shoal-1.time.txt")
    secs = report["seconds"]
    rows.append(("shoal, 1 worker", secs, wall1, rss1, ari(one_users, one_labels)))
    print(f"# shoal scale benchmark — {args.size}: {report['users']} users, "
          f"{report['als']['items'] if 'als' in report else '?'} items, "
          f"{report['rows']['read']} rows read, {report['als']['pairs'] if 'als' in report else '?'} pairs")
    print(f"ALS seconds per iteration (1 worker): "
          + ", ".join(f"{s:.2f}" for s in report.get("als", {}).get("seconds_per_iteration", [])))

    # the same job on several workers: labels identical, bit for bit
    if args.size == "1m":
        four = base / "shoal-4"
        wall4, rss4 = timing(base / "shoal-4.time.txt")
        r4 = json.loads((four / "report.json").read_text())
        rows.append(("shoal, 4 workers (1 process)", r4["seconds"], wall4, rss4, None))
    else:
        four = base / "shoal-4"
        parts = [timing(p) for p in sorted(base.glob("worker-*.time.txt"))]
        coord = timing(base / "coordinator.time.txt")
        r4 = json.loads((four / "report.json").read_text())
        rss4 = sum(p[1] for p in parts) + coord[1]
        rows.append(("shoal, coordinator + 4 worker processes", r4["seconds"], r4["seconds"]["total"], rss4, None))
        print("peak RSS of the processes: coordinator "
              f"{coord[1] / GIB:.2f} GiB, workers " + ", ".join(f"{p[1] / GIB:.2f}" for p in parts) + " GiB")
    four_users, four_labels = assignments(four)
    one = dict(zip(one_users, one_labels))
    same = len(four_users) == len(one_users) and all(one[u] == l for u, l in zip(four_users, four_labels))
    print(f"labels with 1 and 4 workers identical: {same}")
    if not same:
        misses.append("labels differ between 1 and 4 workers")

    peer = None
    if (base / "peer.json").exists():
        peer = json.loads((base / "peer.json").read_text())
        wallp, rssp = timing(base / "peer.time.txt")
        rows.append(("pandas + implicit + scikit-learn", peer["seconds"], wallp, rssp, peer["ari"]))

    phases = ["plan", "ingest", "load", "als", "scale", "init", "lloyd", "finalize", "write"]
    peer_phases = ["read", "rfm", "als", "kmeans", "silhouette", "recommend"]
    print()
    print(f"| tool | phases (s) | wall (s) | peak RSS (GiB) | ARI vs planted |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, s, wall, rss, a in rows:
        keys = peer_phases if "pandas" in name else phases
        ph = ", ".join(f"{k} {s[k]:.1f}" for k in keys if k in s)
        print(f"| {name} | {ph} | {wall:.1f} | {rss / GIB:.2f} | {'' if a is None else f'{a:.3f}'} |")
    print()

    if args.size == "1m":
        if peer is not None:
            speed = rows[-1][2] / wall1
            print(f"shoal (1 worker) is {speed:.2f}x faster than the peer end to end (target >= 4x)")
            if speed < 4.0:
                misses.append(f"speed {speed:.2f}x < 4x")
        print(f"shoal peak RSS with 1 worker {rss1 / GIB:.2f} GiB (target <= 1.5 GB = {1.5e9 / GIB:.2f} GiB)")
        if rss1 > 1.5e9:
            misses.append("1 worker peak RSS over 1.5 GB")
        if (base / "shoal-norec.time.txt").exists():
            print(f"without recommendations (1 worker): {timing(base / 'shoal-norec.time.txt')[0]:.1f} s wall")
    else:
        print(f"sum of the processes' peak RSS {rss4 / GIB:.2f} GiB (target <= 12 GB = {12e9 / GIB:.2f} GiB); "
              f"one worker process {rss1 / GIB:.2f} GiB")
        if rss4 > 12e9 or rss1 > 12e9:
            misses.append("peak RSS over 12 GB")
        yard = base.parent / "1m" / "shoal-norec.time.txt"
        if yard.exists():
            wall_1m = timing(yard)[0]
            ratio = wall1 / wall_1m
            print(f"wall {wall1:.1f} s = {ratio:.1f}x the 1m job without recommendations ({wall_1m:.1f} s; target <= 12x)")
            if ratio > 12:
                misses.append(f"10m wall {ratio:.1f}x the 1m job's")
        else:
            print("(run benches/scale.sh --size 1m first for the 12x yardstick)")
    if misses:
        print("MISSED: " + "; ".join(misses))
        return 1
    print("every target met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
