"""The peer of benches/scale.sh: the same work as a shoal job, written the way a data
team would with pandas, implicit and scikit-learn, on one machine.

Reads a `shoal synth` log (a folder of Parquet files), then:

1. read: the log's columns with pyarrow, into pandas;
2. rfm: per user the days from the last order to the log's last, distinct orders,
   and the sum of quantity x price (pandas groupby);
3. als: implicit's AlternatingLeastSquares (CPU, conjugate gradient) on the
   (user, item) strengths (sum of quantities), confidence 1 + alpha x strength,
   with the factors, iterations, regularization and CG steps given;
4. kmeans: scikit-learn KMeans(n_init=1) on [L2-normalised user factors |
   standardised log1p RFM], the features a shoal job with RFM and ALS builds;
5. silhouette: scikit-learn's silhouette score on a seeded sample of 10,000 users;
6. recommend: implicit's `recommend` of the top N items for every user, the
   user's items filtered out (skipped with --top-n 0).

Prints one JSON line: seconds per phase and in all, users, items, pairs, and the
adjusted Rand index of the labels against the log's planted groups (truth.parquet).
Run it with OPENBLAS_NUM_THREADS=1 (implicit's advice); benches/scale.sh does.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a shoal synth folder (log/, truth.parquet)")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--factors", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--regularization", type=float, default=0.01)
    ap.add_argument("--alpha", type=float, default=40.0)
    ap.add_argument("--cg-steps", type=int, default=3)
    ap.add_argument("--top-n", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="0: every core")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    import pyarrow.dataset as ds
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    seconds = {}
    started = time.perf_counter()

    t = time.perf_counter()
    table = ds.dataset(args.data / "log", format="parquet").to_table(
        columns=["user_id", "item_id", "time", "order_id", "quantity", "price"]
    )
    df = table.to_pandas()
    del table
    seconds["read"] = time.perf_counter() - t

    t = time.perf_counter()
    df["monetary"] = df["quantity"] * df["price"]
    by_user = df.groupby("user_id", sort=True)
    last = by_user["time"].max()
    rfm = np.column_stack(
        [
            ((df["time"].max() - last).dt.total_seconds() / 86400.0).to_numpy(),
            by_user["order_id"].nunique().to_numpy(dtype=np.float64),
            by_user["monetary"].sum().to_numpy(),
        ]
    )
    users = last.index.to_numpy()
    seconds["rfm"] = time.perf_counter() - t

    t = time.perf_counter()
    user_code = np.searchsorted(users, df["user_id"].to_numpy())
    items, item_code = np.unique(df["item_id"].to_numpy(), return_inverse=True)
    strength = sp.csr_matrix(
        (df["quantity"].to_numpy(dtype=np.float32), (user_code, item_code)),
        shape=(len(users), len(items)),
    )
    strength.sum_duplicates()
    del df, user_code, item_code
    confidence = strength.copy()
    confidence.data = 1.0 + args.alpha * confidence.data
    model = AlternatingLeastSquares(
        factors=args.factors,
        regularization=args.regularization,
        alpha=1.0,  # the matrix already holds 1 + alpha * strength
        iterations=args.iterations,
        use_cg=True,
        use_native=True,
        calculate_training_loss=False,
        num_threads=args.threads,
        random_state=args.seed,
    )
    model.cg_steps = args.cg_steps
    model.fit(confidence, show_progress=False)
    seconds["als"] = time.perf_counter() - t

    t = time.perf_counter()
    factors = np.asarray(model.user_factors)
    norms = np.linalg.norm(factors, axis=1, keepdims=True)
    factors = np.divide(factors, norms, out=np.zeros_like(factors), where=norms > 0)
    logged = np.log1p(np.maximum(rfm, 0.0))
    logged = (logged - logged.mean(axis=0)) / np.where(logged.std(axis=0) > 0, logged.std(axis=0), 1.0)
    features = np.hstack([factors, logged]).astype(np.float32)
    kmeans = KMeans(n_clusters=args.k, n_init=1, random_state=args.seed).fit(features)
    labels = kmeans.labels_
    seconds["kmeans"] = time.perf_counter() - t

    t = time.perf_counter()
    silhouette = float(
        silhouette_score(features, labels, sample_size=min(10_000, len(labels)), random_state=args.seed)
    )
    seconds["silhouette"] = time.perf_counter() - t

    t = time.perf_counter()
    recommended = 0
    if args.top_n > 0:
        batch = 100_000
        for first in range(0, len(users), batch):
            ids = np.arange(first, min(first + batch, len(users)))
            got, _ = model.recommend(ids, strength[ids], N=args.top_n, filter_already_liked_items=True)
            recommended += int((got >= 0).sum())
    seconds["recommend"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started

    truth = ds.dataset(args.data / "truth.parquet", format="parquet").to_table().to_pandas()
    truth = truth.set_index("user_id")["group"]
    ari = float(adjusted_rand_score(truth.loc[users].to_numpy(), labels))
    print(
        json.dumps(
            {
                "tool": "peer",
                "users": int(len(users)),
                "items": int(len(items)),
                "pairs": int(strength.nnz),
                "seconds": {k: round(v, 3) for k, v in seconds.items()},
                "silhouette": round(silhouette, 4),
                "recommended": recommended,
                "ari": round(ari, 4),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
