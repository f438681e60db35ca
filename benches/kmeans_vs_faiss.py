#!/usr/bin/env python3
"""Time one Lloyd iteration of shoal's CPU backend against faiss-cpu and scikit-learn.

For every size it runs `shoal bench kmeans` (which generates seeded Gaussian blobs,
writes the points and its initial centroids as .npy, runs the Lloyd iterations and
prints one JSON line), then runs faiss `Kmeans` and scikit-learn `KMeans` on the very
same float32 points from the very same initial centroids, for the same number of
iterations, with the same number of threads. Every tool's inertia is recomputed here
by one function from the final centroids it returns (see `inertia`), and compared
with faiss's.

Also measures the machine's float32 GEMM peak (numpy matmul with the venv's BLAS) in
the same run, so that the GFLOP/s of the assignment pass can be put against it.

Exit status: 0 when every target is met, 1 when one is missed (everything is printed
either way). Run it through benches/kmeans_vs_faiss.sh, which builds shoal first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Targets (stated in the table).
SPEED_FACTOR = 3.0  # shoal secs/iter <= faiss secs/iter / SPEED_FACTOR
INERTIA_RTOL = 0.005  # |shoal - faiss| / faiss <= 0.5 %
PEAK_FRACTION = 0.5  # shoal assign GFLOP/s >= 50 % of the GEMM peak


def parse_size(text: str) -> tuple[int, int, int]:
    """`1000000x64x64` -> (n, d, k)."""
    try:
        n, d, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not NxDxK, e.g. 1000000x64x64")
    return n, d, k


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shoal", type=Path, default=REPO_ROOT / "target" / "release" / "shoal")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "target" / "bench-out" / "kmeans")
    ap.add_argument("--sizes", type=parse_size, nargs="+", default=[(1_000_000, 64, 64), (200_000, 64, 32)])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every tool (default: all cores)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool and size; the fastest is reported")
    ap.add_argument("--gemm-size", type=int, default=4096)
    ap.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn (slow at 1M points)")
    args = ap.parse_args()

    # Thread counts are set through the libraries' own calls, not OMP_NUM_THREADS /
    # OPENBLAS_NUM_THREADS: faiss's OpenMP loops call its OpenBLAS, and with that
    # variable set both spawn pools that fight over the cores (10x slower here).
    import numpy as np
    import faiss
    import sklearn
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_info, threadpool_limits

    faiss.omp_set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
        """Sum over the points of the squared distance to the nearest centroid, all in
        float64 (exact enough to compare tools to 1e-9): the inertia of the final
        centroids C_I, the definition `shoal bench kmeans` reports."""
        c = centroids.astype(np.float64)
        c_norms = (c * c).sum(axis=1)
        total = 0.0
        for start in range(0, x.shape[0], 65536):
            xc = x[start : start + 65536].astype(np.float64)
            d2 = (xc * xc).sum(axis=1)[:, None] - 2.0 * (xc @ c.T) + c_norms[None, :]
            total += float(np.maximum(d2.min(axis=1), 0.0).sum())
        return total

    load_before = os.getloadavg()[0]
    with threadpool_limits(limits=args.threads, user_api="blas"):
        peak_before = gemm_peak(np, args.gemm_size)
    pools = [
        f"{p['internal_api']} {p.get('version') or ''} {p.get('architecture') or ''} ({p['num_threads']} threads)".replace("  ", " ")
        for p in threadpool_info()
    ]

    rows: list[dict] = []
    for n, d, k in args.sizes:
        nominal = 2.0 * n * k * d
        tag = f"{n}x{d}x{k}"
        x_path, init_path, cent_path = (args.out / f"{tag}-{what}.npy" for what in ("points", "init", "shoal-centroids"))

        def run_shoal(write: bool, full: bool = False) -> dict:
            cmd = [
                str(args.shoal), "bench", "kmeans",
                "--n", str(n), "--d", str(d), "--k", str(k),
                "--iters", str(args.iters), "--seed", str(args.seed),
                "--device", "cpu", "--threads", str(args.threads),
            ]
            if full:
                cmd += ["--full-passes"]
            if write:
                cmd += ["--write-npy", str(x_path), "--write-init-npy", str(init_path),
                        "--write-centroids-npy", str(cent_path)]
            print("==> " + " ".join(cmd), file=sys.stderr)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        def run_faiss():
            km = faiss.Kmeans(d, k, niter=args.iters, max_points_per_centroid=10**9, seed=args.seed, verbose=False)
            t0 = time.perf_counter()
            km.train(x, init_centroids=init)
            return time.perf_counter() - t0, km

        def run_sklearn():
            with threadpool_limits(limits=args.threads):
                skm = KMeans(n_clusters=k, init=init, n_init=1, max_iter=args.iters, tol=0.0,
                             algorithm="lloyd", random_state=args.seed)
                t0 = time.perf_counter()
                skm.fit(x)
                return time.perf_counter() - t0, skm

        # The first shoal run writes the data; then the tools take turns, `repeat`
        # rounds, so that a busy spell of the machine hits them alike. Each keeps
        # its fastest run. (shoal's runs are identical but for the timings.)
        shoal = run_shoal(write=True)
        shoal_full = run_shoal(write=False, full=True)
        x = np.load(x_path)
        init = np.load(init_path)
        assert x.dtype == np.float32 and x.shape == (n, d) and x.flags["C_CONTIGUOUS"], (x.dtype, x.shape)
        assert init.shape == (k, d)
        best_faiss = best_sklearn = None
        for rep in range(args.repeat):
            if rep > 0:
                report = run_shoal(write=False)
                if report["secs_per_iter"] < shoal["secs_per_iter"]:
                    shoal = report
                report = run_shoal(write=False, full=True)
                if report["secs_per_iter"] < shoal_full["secs_per_iter"]:
                    shoal_full = report
            t = run_faiss()
            if best_faiss is None or t[0] < best_faiss[0]:
                best_faiss = t
            if not args.no_sklearn:
                t = run_sklearn()
                if best_sklearn is None or t[0] < best_sklearn[0]:
                    best_sklearn = t

        # --- shoal
        shoal_centroids = np.load(cent_path)
        rows.append({
            "size": tag, "n": n, "d": d, "k": k, "tool": "shoal", "iters": args.iters,
            "secs_per_iter": shoal["secs_per_iter"],
            "assign_secs": shoal["assign_secs_per_iter"],
            "assign_gflops": shoal["assign_gflops"],
            "inertia": inertia(x, shoal_centroids),
            "reported_inertia": shoal["inertia"],
            "recomputed": shoal["iter_recomputed"],
            "last_assign_inertia": None,
            "note": "Backend::lloyd_round (exact labels, skips points whose label is certified "
                    "unchanged by distance bounds, and their partial sums); assign GFLOP/s = "
                    "nominal 2nkd over its time",
        })
        # The same iterations with a full distance pass each (the kernel's own rate).
        assert shoal_full["inertia"] == shoal["inertia"], (shoal_full["inertia"], shoal["inertia"])
        rows.append({
            "size": tag, "n": n, "d": d, "k": k, "tool": "shoal, full passes", "iters": args.iters,
            "secs_per_iter": shoal_full["secs_per_iter"],
            "assign_secs": shoal_full["assign_secs_per_iter"],
            "assign_gflops": shoal_full["assign_gflops"],
            "inertia": inertia(x, shoal_centroids),
            "reported_inertia": shoal_full["inertia"],
            "last_assign_inertia": shoal_full["iter_inertia"][-1],
            "note": "--full-passes: Backend::assign, every distance every iteration; "
                    "assign = its mean time per iteration",
        })

        # --- faiss
        secs, km = best_faiss
        # iteration_stats times are cumulative since the start of train.
        search_total = km.iteration_stats[-1]["time_search"]
        rows.append({
            "size": tag, "n": n, "d": d, "k": k, "tool": f"faiss-cpu {faiss.__version__}", "iters": len(km.obj),
            "secs_per_iter": secs / args.iters,
            "assign_secs": search_total / len(km.obj),
            "assign_gflops": nominal / (search_total / len(km.obj)) / 1e9,
            "inertia": inertia(x, km.centroids),
            "reported_inertia": None,
            "last_assign_inertia": float(km.obj[-1]),
            "note": "assign = faiss's own time_search per iteration",
        })
        faiss_row = rows[-1]

        # --- scikit-learn
        if not args.no_sklearn:
            secs, skm = best_sklearn
            # scikit-learn does not time its E-step apart: time `predict`, the same
            # chunked GEMM + argmin without the centroid update, best of 3.
            with threadpool_limits(limits=args.threads):
                pred = min(timed(lambda: skm.predict(x)) for _ in range(3))
            rows.append({
                "size": tag, "n": n, "d": d, "k": k, "tool": f"scikit-learn {sklearn.__version__}", "iters": int(skm.n_iter_),
                "secs_per_iter": secs / skm.n_iter_,
                "assign_secs": pred,
                "assign_gflops": nominal / pred / 1e9,
                "inertia": inertia(x, skm.cluster_centers_),
                "reported_inertia": float(skm.inertia_),
                "last_assign_inertia": None,
                "note": "assign = predict() timed apart; fit time includes input checks and a final E-step",
            })

        for r in rows:
            if r["size"] == tag:
                r["rel_inertia_vs_faiss"] = (r["inertia"] - faiss_row["inertia"]) / faiss_row["inertia"]

    # The GEMM peak again at the end; the higher of the two counts (the stricter target).
    with threadpool_limits(limits=args.threads, user_api="blas"):
        peak_after = gemm_peak(np, args.gemm_size)
    peak = max(peak_before, peak_after)
    load_after = os.getloadavg()[0]
    # Other work on the machine shows as two GEMM peaks far apart; faiss suffers
    # most from it (its OpenMP threads wait by spinning), so such a run can make
    # shoal look several times faster than it is.
    busy = min(peak_before, peak_after) < 0.85 * peak
    for r in rows:
        r["peak_fraction"] = r["assign_gflops"] / peak

    # --- checks
    failures: list[str] = []
    for n, d, k in args.sizes:
        tag = f"{n}x{d}x{k}"
        s = next(r for r in rows if r["size"] == tag and r["tool"] == "shoal")
        sf = next(r for r in rows if r["size"] == tag and r["tool"] == "shoal, full passes")
        f = next(r for r in rows if r["size"] == tag and r["tool"].startswith("faiss"))
        if not s["secs_per_iter"] <= f["secs_per_iter"] / SPEED_FACTOR:
            failures.append(f"{tag}: shoal {s['secs_per_iter']:.4f} s/iter is not <= faiss {f['secs_per_iter']:.4f} / {SPEED_FACTOR:g} "
                            f"(speed-up {f['secs_per_iter'] / s['secs_per_iter']:.2f}x)")
        if not abs(s["rel_inertia_vs_faiss"]) <= INERTIA_RTOL:
            failures.append(f"{tag}: shoal inertia differs from faiss by {100 * s['rel_inertia_vs_faiss']:+.3f} %")
        if not sf["peak_fraction"] >= PEAK_FRACTION:
            failures.append(f"{tag}: shoal's full assign pass reaches {100 * sf['peak_fraction']:.1f} % of the GEMM peak")
        # shoal's own inertia (f32 distances summed in f64) against the float64 recomputation.
        if not abs(s["reported_inertia"] - s["inertia"]) <= 1e-5 * s["inertia"]:
            failures.append(f"{tag}: shoal reports inertia {s['reported_inertia']:.6g}, recomputed {s['inertia']:.6g}")

    # --- report
    print()
    print(f"k-means Lloyd iteration: shoal vs faiss-cpu vs scikit-learn — {datetime.date.today().isoformat()}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; every tool runs with {args.threads} threads; "
          f"{args.iters} iterations, seed {args.seed}, same points and initial centroids; best of {args.repeat} interleaved run(s) per tool")
    print(f"GEMM peak: numpy {np.__version__} float32 {args.gemm_size}x{args.gemm_size} matmul with {args.threads} threads, best of 5, "
          f"measured before ({peak_before:.1f}) and after ({peak_after:.1f}) the tools: {peak:.1f} GFLOP/s")
    print("thread pools: " + "; ".join(pools))
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    if busy:
        print("WARNING: the GEMM peak moved by more than 15 % during the run: the machine was busy, "
              "the figures below are not reliable; run again on a quiet machine")
    print()
    print("| size (n x d, k) | tool | secs/iter | inertia | vs faiss | assign GFLOP/s | % of GEMM peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['n']:,} x {r['d']}, k={r['k']} | {r['tool']} | {r['secs_per_iter']:.4f} | {r['inertia']:.6e} | "
              f"{100 * r['rel_inertia_vs_faiss']:+.4f} % | {r['assign_gflops']:.1f} | {100 * r['peak_fraction']:.1f} % |")
    print()
    for n, d, k in args.sizes:
        tag = f"{n}x{d}x{k}"
        s = next(r for r in rows if r["size"] == tag and r["tool"] == "shoal")
        sf = next(r for r in rows if r["size"] == tag and r["tool"] == "shoal, full passes")
        f = next(r for r in rows if r["size"] == tag and r["tool"].startswith("faiss"))
        print(f"{tag}: shoal is {f['secs_per_iter'] / s['secs_per_iter']:.2f}x faster per iteration than faiss "
              f"(target >= {SPEED_FACTOR:g}x); inertia {100 * s['rel_inertia_vs_faiss']:+.4f} % (target within "
              f"{100 * INERTIA_RTOL:g} %); full assign pass {100 * sf['peak_fraction']:.1f} % of GEMM peak (target >= {100 * PEAK_FRACTION:g} %)")
        print(f"    points whose distances shoal computed, per iteration: {s['recomputed']}")
        print(f"    last-assignment inertia (against C_(I-1)): shoal {sf['last_assign_inertia']:.6e}, faiss obj[-1] {f['last_assign_inertia']:.6e}")
    print()
    print("inertia: sum of squared distances of every point to the nearest final centroid C_I (after the last update),")
    print("recomputed here in float64 from each tool's centroids. assign GFLOP/s: 2*n*k*d per assignment pass;")
    for r in rows[: 4 if not args.no_sklearn else 3]:
        print(f"  {r['tool']}: {r['note']}")

    if busy:
        failures.append("the machine was busy during the run (GEMM peak moved by more than 15 %)")
    summary = {"date": datetime.date.today().isoformat(), "gemm_peak_gflops": peak, "busy": busy,
               "gemm_peak_before_gflops": peak_before, "gemm_peak_after_gflops": peak_after, "threads": args.threads,
               "iters": args.iters, "seed": args.seed, "pools": pools, "rows": rows, "failures": failures}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    if failures:
        print("TARGETS MISSED:")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("ALL TARGETS MET")
    return 0


def timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def gemm_peak(np, size: int) -> float:
    """Best-of-5 GFLOP/s of a float32 square matmul with numpy's BLAS."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b) for _ in range(5))
    return 2.0 * size**3 / best / 1e9


if __name__ == "__main__":
    sys.exit(main())
