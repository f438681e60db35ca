#!/usr/bin/env python3
"""Compare shoal's k-means on the Online Retail RFM features with scikit-learn's.

Reads the job spec (default: benches/rfm_vs_sklearn.toml) for the input file, the
output folder and k; recomputes the RFM features independently with pandas, with the
same cleaning as shoal; checks shoal's per-user RFM against them; runs scikit-learn's
KMeans on the same feature matrix; and compares the inertia of shoal's labelling with
scikit-learn's.

Exit status: 0 when every check passes, 1 when one fails (the table says which).
Run it through benches/rfm_vs_sklearn.sh, which builds shoal and runs the job first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_info, threadpool_limits

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = REPO_ROOT / "benches" / "rfm_vs_sklearn.toml"

# shoal's RFM must match the pandas figures within this relative tolerance.
RFM_RTOL = 1e-6
# An absolute floor, for values that are (close to) zero, e.g. recency of the last buyer.
RFM_ATOL = 1e-9
RFM_COLUMNS = ["recency_days", "frequency", "monetary"]


class CheckFailed(Exception):
    """A comparison between shoal and the reference did not hold."""


# --------------------------------------------------------------------------- spec


def load_spec(spec_path: Path, output_override: Path | None) -> dict:
    with open(spec_path, "rb") as f:
        spec = tomllib.load(f)
    try:
        cols = spec["input"]["columns"]
        clean = spec["input"].get("clean", {})
        params = {
            "input": resolve(spec["input"]["interactions"]),
            "output": output_override or resolve(spec["output"]["path"]),
            "k": int(spec["segments"]["k"]),
            "user": cols["user"],
            "time": cols["time"],
            "order": cols["order"],
            "quantity": cols["quantity"],
            "price": cols["price"],
            "drop_order_prefixes": list(clean.get("drop_order_prefixes", [])),
            "min_quantity": clean.get("min_quantity"),
            "min_price": clean.get("min_price"),
        }
    except KeyError as e:
        raise SystemExit(f"{spec_path}: missing key {e} in the job spec")
    if spec.get("features", {}).get("rfm") is not True:
        raise SystemExit(f"{spec_path}: this benchmark needs [features] rfm = true")
    extra = set(spec.get("features", {})) - {"rfm"}
    if extra:
        raise SystemExit(
            f"{spec_path}: [features] has {sorted(extra)}; this benchmark rebuilds only "
            "the RFM features, so the spec must use RFM alone"
        )
    return params


def resolve(path: str) -> Path:
    """Relative paths in a spec are resolved against the repo root (where shoal runs)."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


# --------------------------------------------------------------------------- reference RFM


def reference_rfm(p: dict) -> tuple[pd.DataFrame, dict]:
    """Per-user recency_days / frequency / monetary, cleaned as the spec says.

    The user id is the user column's text exactly as written in the file
    (e.g. "17850.0"), as shoal keeps it.
    """
    u, t, o, q, pr = p["user"], p["time"], p["order"], p["quantity"], p["price"]
    raw = pd.read_csv(
        p["input"],
        usecols=[u, t, o, q, pr],
        dtype={u: str, o: str, t: str, q: str, pr: str},
        keep_default_na=False,
    )
    stats = {"rows": len(raw)}

    df = pd.DataFrame(
        {
            "user": raw[u],
            "order": raw[o],
            "time": pd.to_datetime(raw[t], format="%Y-%m-%d %H:%M:%S", errors="coerce"),
            "quantity": pd.to_numeric(raw[q], errors="coerce"),
            "price": pd.to_numeric(raw[pr], errors="coerce"),
        }
    )
    # on_bad_rows = "skip": a row whose time, quantity or price does not parse is dropped.
    bad = df["time"].isna() | df["quantity"].isna() | df["price"].isna()
    stats["bad_rows"] = int(bad.sum())
    df = df[~bad]

    keep = df["user"] != ""
    for prefix in p["drop_order_prefixes"]:
        keep &= ~df["order"].str.startswith(prefix)
    if p["min_quantity"] is not None:
        keep &= df["quantity"] >= p["min_quantity"]
    if p["min_price"] is not None:
        keep &= df["price"] > p["min_price"]
    df = df[keep]
    stats["kept_rows"] = len(df)

    df = df.assign(amount=df["quantity"].astype("float64") * df["price"].astype("float64"))
    now = df["time"].max()
    g = df.groupby("user", sort=True)
    rfm = pd.DataFrame(
        {
            "recency_days": (now - g["time"].max()).dt.total_seconds() / 86400.0,
            "frequency": g["order"].nunique().astype("uint64"),
            "monetary": g["amount"].sum(),
        }
    )
    rfm.index = rfm.index.astype(str)
    rfm.index.name = "user_id"
    return rfm, stats


def scaled_features(rfm: pd.DataFrame) -> np.ndarray:
    """log1p of each RFM column, standardised with the population mean/std (ddof=0)."""
    x = np.log1p(rfm[RFM_COLUMNS].to_numpy(dtype=np.float64))
    mean = x.mean(axis=0)
    std = x.std(axis=0, ddof=0)
    std[std == 0.0] = 1.0  # as StandardScaler does for a constant column
    return (x - mean) / std


# --------------------------------------------------------------------------- shoal output


def read_parquet(path: Path, files: list[Path] | None = None) -> pd.DataFrame:
    """A Parquet file, the listed files, or a folder of parts (files starting with
    '_' or '.' are skipped)."""
    if not path.exists():
        raise CheckFailed(f"{path} does not exist")
    source = [str(f) for f in files] if files else str(path)
    return pads.dataset(source, format="parquet").to_table().to_pandas()


def read_shoal_output(out: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    """assignments, centroids (None if absent) and report.json of a finished job.

    Only a folder with a `_SUCCESS` manifest is trusted. When the manifest lists the
    assignment parts, exactly those are read and their row counts are checked.
    """
    manifest_path = out / "_SUCCESS"
    if not manifest_path.exists():
        raise CheckFailed(f"{manifest_path} is missing: shoal's output folder is not complete")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = [
            f
            for f in manifest["files"]
            if f["path"] == "assignments.parquet"
            or f["path"].startswith("assignments.parquet/")
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckFailed(f"{manifest_path} is not a shoal manifest: {e!r}")

    parts = [out / f["path"] for f in listed if f["path"].startswith("assignments.parquet/")]
    assignments = read_parquet(out / "assignments.parquet", parts or None)
    if listed:
        rows = sum(int(f.get("rows", 0)) for f in listed)
        if rows != len(assignments):
            raise CheckFailed(
                f"manifest lists {rows} assignment rows, the files hold {len(assignments)}"
            )
    missing = {"user_id", "segment", *RFM_COLUMNS} - set(assignments.columns)
    if missing:
        raise CheckFailed(
            f"{out}/assignments.parquet lacks columns {sorted(missing)}; "
            f"it has {list(assignments.columns)}"
        )
    centroids = None
    if (out / "centroids.parquet").exists():
        centroids = read_parquet(out / "centroids.parquet")
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckFailed(f"cannot read {out}/report.json: {e}")
    return assignments, centroids, report


def report_value(report: dict, failures: list[str], *keys: str) -> float | None:
    """report[keys[0]][keys[1]]...; a missing or non-numeric value is a failure."""
    v = report
    for k in keys:
        if not isinstance(v, dict) or k not in v:
            failures.append(f"report.json has no {'.'.join(keys)}")
            return None
        v = v[k]
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        failures.append(f"report.json {'.'.join(keys)} is {v!r}, not a number")
        return None
    return float(v)


def check_rfm(rfm: pd.DataFrame, assignments: pd.DataFrame) -> list[str]:
    """Same users, and RFM equal within RFM_RTOL. Returns the failures found."""
    failures = []
    ids = assignments["user_id"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        failures.append(f"{len(dup)} duplicate user_id in assignments, e.g. {list(dup[:3])}")
    shoal_users, ref_users = set(ids), set(rfm.index)
    if shoal_users != ref_users:
        only_s = sorted(shoal_users - ref_users)
        only_r = sorted(ref_users - shoal_users)
        failures.append(
            f"user sets differ: {len(only_s)} only in shoal (e.g. {only_s[:3]}), "
            f"{len(only_r)} only in the reference (e.g. {only_r[:3]})"
        )
        return failures
    s = assignments.assign(user_id=ids).drop_duplicates("user_id").set_index("user_id")
    s = s.loc[rfm.index]
    for col in RFM_COLUMNS:
        a = s[col].to_numpy(dtype=np.float64)
        b = rfm[col].to_numpy(dtype=np.float64)
        bad = ~np.isclose(a, b, rtol=RFM_RTOL, atol=RFM_ATOL)
        if bad.any():
            i = np.flatnonzero(bad)[:3]
            examples = ", ".join(
                f"{rfm.index[j]}: shoal {float(a[j])!r} vs {float(b[j])!r}" for j in i
            )
            failures.append(f"{col}: {int(bad.sum())} users differ ({examples})")
    return failures


# --------------------------------------------------------------------------- inertia


def inertia_of_labels(x: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of each point to the mean of its cluster's points."""
    total = 0.0
    for c in np.unique(labels):
        pts = x[labels == c]
        total += float(((pts - pts.mean(axis=0)) ** 2).sum())
    return total


def inertia_to_centroids(
    x: np.ndarray, labels: np.ndarray, centroids: pd.DataFrame
) -> float | None:
    """Inertia against shoal's own (f32) centroids, or None if they don't fit x."""
    if not {"segment", "centroid"} <= set(centroids.columns):
        return None
    table = {
        int(seg): np.asarray(c, dtype=np.float64)
        for seg, c in zip(centroids["segment"], centroids["centroid"])
    }
    if any(v.shape != (x.shape[1],) for v in table.values()):
        return None
    if not set(np.unique(labels).tolist()) <= set(table):
        return None
    c = np.stack([table[int(l)] for l in labels])
    return float(((x - c) ** 2).sum())


def default_threads() -> int:
    """Threads of the OpenMP pool scikit-learn's k-means runs on by default."""
    n = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "openmp"]
    return max(n) if n else 1


def sizes(labels: np.ndarray, k: int) -> list[int]:
    """Segment sizes, largest first; an empty segment shows as 0."""
    return sorted(np.bincount(labels.astype(np.int64), minlength=k).tolist(), reverse=True)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="shoal job spec (TOML)")
    ap.add_argument("--output", type=Path, help="shoal output folder (default: the spec's)")
    ap.add_argument(
        "--slack",
        type=float,
        default=0.01,
        help="PASS if shoal's inertia <= sklearn's * (1 + slack) (default 0.01)",
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="time sklearn as the best of N fits (default 3)"
    )
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    p = load_spec(args.spec, args.output)
    k = p["k"]
    failures: list[str] = []

    rfm, stats = reference_rfm(p)
    x = scaled_features(rfm)
    n = len(rfm)

    def fit() -> KMeans:
        return KMeans(
            n_clusters=k, n_init=10, algorithm="lloyd", random_state=0, max_iter=300, tol=1e-4
        ).fit(x)

    km = fit()
    # Timed as the best of a few fits, with one thread and with the default OpenMP pool:
    # a fit takes well under a second, and on a busy machine OpenMP's spinning threads
    # can make the pooled fit many times slower than the single-threaded one.
    sk_seconds: dict[int, float] = {}
    for threads in sorted({1, default_threads()}):
        with threadpool_limits(limits=threads, user_api="openmp"):
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fit()
                elapsed = time.perf_counter() - t0
                sk_seconds[threads] = min(sk_seconds.get(threads, elapsed), elapsed)
    sk_inertia = float(km.inertia_)
    sk_labels = km.labels_

    shoal_inertia = reported = vs_centroids = shoal_seconds = None
    shoal_labels = None
    try:
        assignments, centroids, report = read_shoal_output(p["output"])
        failures += check_rfm(rfm, assignments)
        reported = report_value(report, failures, "kmeans", "inertia")
        shoal_seconds = report_value(report, failures, "seconds", "total")
        ids = assignments["user_id"].astype(str)
        if set(ids) == set(rfm.index) and not ids.duplicated().any():
            # Labels are compared on the reference features even when some RFM value
            # differs (that is already a failure), to show how far off the result is.
            seg = (
                assignments.assign(user_id=ids)
                .set_index("user_id")
                .loc[rfm.index, "segment"]
                .to_numpy()
                .astype(np.int64)
            )
            if seg.min() < 0 or seg.max() >= k:
                failures.append(f"segment ids outside 0..{k - 1}: {sorted(set(seg))}")
            else:
                shoal_labels = seg
                shoal_inertia = inertia_of_labels(x, seg)
                if centroids is not None:
                    vs_centroids = inertia_to_centroids(x, seg, centroids)
    except CheckFailed as e:
        failures.append(str(e))

    def fmt(v: float | None, spec: str = ".4f") -> str:
        return "n/a" if v is None else format(v, spec)

    rel = None if shoal_inertia is None else (shoal_inertia - sk_inertia) / sk_inertia
    kept = f"{stats['rows']} / {stats['kept_rows']} / {stats['bad_rows']}"
    rows = [
        ("input rows / kept / unparsable", kept),
        ("users (n)", str(n)),
        ("k", str(k)),
        ("sklearn inertia (n_init=10, lloyd)", fmt(sk_inertia)),
        ("shoal inertia, report.json", fmt(reported)),
        ("shoal inertia, recomputed from labels", fmt(shoal_inertia)),
        ("shoal inertia, to shoal's centroids", fmt(vs_centroids)),
        ("relative difference (shoal - sklearn)", "n/a" if rel is None else f"{rel:+.4%}"),
        *(
            (f"sklearn seconds, {t} thread(s), n_init=10 (best of {args.repeat})", fmt(sec, ".3f"))
            for t, sec in sk_seconds.items()
        ),
        ("sklearn iterations (best init)", str(km.n_iter_)),
        ("shoal seconds (report seconds.total)", fmt(shoal_seconds, ".3f")),
        ("sklearn segment sizes", str(sizes(sk_labels, k))),
        ("shoal segment sizes", "n/a" if shoal_labels is None else str(sizes(shoal_labels, k))),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"RFM k-means, shoal vs scikit-learn, on {p['input']} (shoal output: {p['output']})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")

    if shoal_inertia is not None and shoal_inertia > sk_inertia * (1.0 + args.slack):
        failures.append(
            f"shoal's inertia {shoal_inertia:.4f} > sklearn's {sk_inertia:.4f} "
            f"* {1.0 + args.slack:g}"
        )
    if shoal_inertia is None and not failures:
        failures.append("shoal's labels could not be compared")
    if failures:
        print("FAIL")
        for f in failures:
            print(f"  - {f}")
        return 1
    print(
        f"PASS (shoal's inertia <= sklearn's * {1.0 + args.slack:g}; "
        f"RFM equal within {RFM_RTOL:g} relative)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
