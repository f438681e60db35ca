//! Plain, obviously-correct twins of the backend kernels, written for clarity
//! rather than speed. Every backend is tested against these.
//!
//! Unlike the backends, these functions do not validate their input with errors:
//! they panic on inconsistent shapes or out-of-range labels, which is what a test
//! wants.

use crate::{NO_SECOND, Nearest, PartialSums};

/// Squared Euclidean distance, accumulated in f32 one feature after the other.
pub fn squared_distance(x: &[f32], c: &[f32]) -> f32 {
    assert_eq!(
        x.len(),
        c.len(),
        "point and centroid have different lengths"
    );
    let mut acc = 0.0f32;
    for (a, b) in x.iter().zip(c) {
        let t = a - b;
        acc += t * t;
    }
    acc
}

/// Nearest and second-nearest centroid of every point (`n x d` and `k x d`,
/// row-major). Ties go to the lowest index; with `k = 1` the second-best is
/// `NO_SECOND` at infinity.
///
/// # Panics
/// If `d` or `k` is 0 or the slices are not `n x d` and `k x d`.
pub fn assign(points: &[f32], d: usize, centroids: &[f32], k: usize) -> Vec<Nearest> {
    assert!(d >= 1, "d must be at least 1");
    assert!(k >= 1, "k must be at least 1");
    assert_eq!(points.len() % d, 0, "points are not a whole number of rows");
    assert_eq!(centroids.len(), k * d, "centroids are not k x d");

    points
        .chunks_exact(d)
        .map(|x| {
            let dist: Vec<f32> = centroids
                .chunks_exact(d)
                .map(|c| squared_distance(x, c))
                .collect();

            let mut best = 0;
            for j in 1..k {
                if dist[j] < dist[best] {
                    best = j;
                }
            }

            let mut second: Option<usize> = None;
            for j in (0..k).filter(|&j| j != best) {
                match second {
                    Some(s) if dist[j] >= dist[s] => {}
                    _ => second = Some(j),
                }
            }

            match second {
                Some(s) => Nearest {
                    best: best as u32,
                    best_dist: dist[best],
                    second: s as u32,
                    second_dist: dist[s],
                },
                None => Nearest {
                    best: best as u32,
                    best_dist: dist[best],
                    second: NO_SECOND,
                    second_dist: f32::INFINITY,
                },
            }
        })
        .collect()
}

/// Per-label sums (f64) and counts, accumulated sequentially in point order.
///
/// # Panics
/// If `d` is 0, the shapes disagree, or a label is not below `k`.
pub fn partial_sums(points: &[f32], d: usize, labels: &[u32], k: usize) -> PartialSums {
    assert!(d >= 1, "d must be at least 1");
    assert_eq!(
        points.len(),
        labels.len() * d,
        "one label per point is needed"
    );

    let mut out = PartialSums::zeros(k, d);
    for (x, &label) in points.chunks_exact(d).zip(labels) {
        let label = label as usize;
        assert!(label < k, "label {label} is not below k = {k}");
        out.counts[label] += 1;
        for (s, &v) in out.sums[label * d..(label + 1) * d].iter_mut().zip(x) {
            *s += f64::from(v);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// ALS and recommendations.

use crate::{CgParams, Csr, NO_ITEM, TopN};

/// `AᵀA` (`d x d`, row-major) of the row-major `a`, accumulated in f64 one row
/// after the other.
///
/// # Panics
/// If `d` is 0 or `a` is not a whole number of rows.
pub fn gram(a: &[f32], d: usize) -> Vec<f64> {
    assert!(d >= 1, "d must be at least 1");
    assert_eq!(a.len() % d, 0, "a is not a whole number of rows");
    let mut g = vec![0.0f64; d * d];
    for row in a.chunks_exact(d) {
        for i in 0..d {
            for j in 0..d {
                g[i * d + j] += f64::from(row[i]) * f64::from(row[j]);
            }
        }
    }
    g
}

/// Row `i` of the row-major `m` with `d` columns.
fn row_of(m: &[f32], d: usize, i: u32) -> &[f32] {
    let i = i as usize;
    &m[i * d..(i + 1) * d]
}

/// f32 dot product, one term after the other.
fn dot32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for k in 0..a.len() {
        acc += a[k] * b[k];
    }
    acc
}

/// The conjugate-gradient half-step of the `implicit` library (`_solve_cg`) for
/// one row, in plain f32 loops: `cg_steps` steps on
/// `(YᵀY + λI + Yᵀ(C_u − I)Y) x = Yᵀ C_u p_u` from the given `x`, for the row
/// whose stored items are `cols` with confidences `conf`. `yty` is the plain Gram
/// `YᵀY` of the item factors `y` (row-major, `d` features per row).
///
/// # Panics
/// If the shapes disagree.
pub fn als_solve_row(
    yty: &[f64],
    regularization: f32,
    y: &[f32],
    cols: &[u32],
    conf: &[f32],
    x: &mut [f32],
    cg_steps: u32,
) {
    let d = x.len();
    assert_eq!(yty.len(), d * d, "yty is not d x d");
    assert_eq!(cols.len(), conf.len(), "one confidence per item is needed");

    // A = YᵀY + λI, rounded once to f32.
    let mut a = vec![0.0f32; d * d];
    for i in 0..d {
        for j in 0..d {
            let mut v = yty[i * d + j];
            if i == j {
                v += f64::from(regularization);
            }
            a[i * d + j] = v as f32;
        }
    }
    // (A + Yᵀ(C_u − I)Y) v, without forming the matrix.
    let apply = |v: &[f32]| -> Vec<f32> {
        let mut out = vec![0.0f32; d];
        for i in 0..d {
            out[i] = dot32(&a[i * d..(i + 1) * d], v);
        }
        for (&item, &c) in cols.iter().zip(conf) {
            let yi = row_of(y, d, item);
            let t = (c - 1.0) * dot32(yi, v);
            for k in 0..d {
                out[k] += t * yi[k];
            }
        }
        out
    };

    // r = Yᵀ C_u p_u − (A + Yᵀ(C_u − I)Y) x
    let mut r = vec![0.0f32; d];
    for i in 0..d {
        r[i] = -dot32(&a[i * d..(i + 1) * d], x);
    }
    for (&item, &c) in cols.iter().zip(conf) {
        let yi = row_of(y, d, item);
        let t = c - (c - 1.0) * dot32(yi, x);
        for k in 0..d {
            r[k] += t * yi[k];
        }
    }
    let mut p = r.clone();
    let mut rs_old = dot32(&r, &r);
    if rs_old < 1e-20 {
        return;
    }
    for _ in 0..cg_steps {
        let ap = apply(&p);
        let p_ap = dot32(&p, &ap);
        if p_ap.is_nan() || p_ap <= 0.0 {
            break;
        }
        let alpha = rs_old / p_ap;
        for k in 0..d {
            x[k] += alpha * p[k];
            r[k] -= alpha * ap[k];
        }
        let rs_new = dot32(&r, &r);
        if rs_new < 1e-20 {
            break;
        }
        for k in 0..d {
            p[k] = r[k] + (rs_new / rs_old) * p[k];
        }
        rs_old = rs_new;
    }
}

/// [`als_solve_row`] on every row of `x` (`confidence.rows` rows of `d` features).
///
/// # Panics
/// If the shapes disagree.
pub fn als_solve(
    x: &mut [f32],
    y: &[f32],
    d: usize,
    yty: &[f64],
    confidence: &Csr,
    params: CgParams,
) {
    assert!(d >= 1, "d must be at least 1");
    assert_eq!(x.len(), confidence.rows * d, "x is not confidence.rows x d");
    assert_eq!(y.len(), confidence.cols * d, "y is not confidence.cols x d");
    for (u, xu) in x.chunks_exact_mut(d).enumerate() {
        let (cols, conf) = confidence.row(u);
        als_solve_row(
            yty,
            params.regularization,
            y,
            cols,
            conf,
            xu,
            params.cg_steps,
        );
    }
}

/// The stored pairs' part of the implicit-ALS data term for the rows of `x`
/// (`confidence.rows x d`) against `y`: `Σ_u Σ_{i ∈ u} c_ui (1 − s)² − s²` with
/// `s = x_u · y_i` (an f32 dot product), the terms in f64, one after the other.
///
/// # Panics
/// If the shapes disagree.
pub fn pair_loss(x: &[f32], y: &[f32], d: usize, confidence: &Csr) -> f64 {
    assert_eq!(x.len(), confidence.rows * d, "x is not confidence.rows x d");
    assert_eq!(y.len(), confidence.cols * d, "y is not confidence.cols x d");
    let mut total = 0.0f64;
    for (u, xu) in x.chunks_exact(d).enumerate() {
        let (cols, conf) = confidence.row(u);
        for (&i, &c) in cols.iter().zip(conf) {
            let s = f64::from(dot32(xu, row_of(y, d, i)));
            total += f64::from(c) * (1.0 - s) * (1.0 - s) - s * s;
        }
    }
    total
}

/// The exact minimiser of the implicit-ALS objective of one row: builds
/// `YᵀY + λI + Yᵀ(C_u − I)Y` and `Yᵀ C_u p_u` in f64 and solves with a Cholesky
/// factorisation.
///
/// # Panics
/// If the shapes disagree or the system is not positive definite.
pub fn als_exact_row(
    yty: &[f64],
    regularization: f32,
    y: &[f32],
    d: usize,
    cols: &[u32],
    conf: &[f32],
) -> Vec<f64> {
    assert_eq!(yty.len(), d * d, "yty is not d x d");
    let mut m = yty.to_vec();
    for i in 0..d {
        m[i * d + i] += f64::from(regularization);
    }
    let mut b = vec![0.0f64; d];
    for (&item, &c) in cols.iter().zip(conf) {
        let yi = row_of(y, d, item);
        let c = f64::from(c);
        for i in 0..d {
            b[i] += c * f64::from(yi[i]);
            for j in 0..d {
                m[i * d + j] += (c - 1.0) * f64::from(yi[i]) * f64::from(yi[j]);
            }
        }
    }
    cholesky_solve(&m, &b)
}

/// Solves `m x = b` for the symmetric positive definite row-major `m`.
///
/// # Panics
/// If `m` is not positive definite (or the shapes disagree).
pub fn cholesky_solve(m: &[f64], b: &[f64]) -> Vec<f64> {
    let d = b.len();
    assert_eq!(m.len(), d * d, "m is not d x d");
    // m = L Lᵀ, L lower triangular.
    let mut l = vec![0.0f64; d * d];
    for j in 0..d {
        let mut diag = m[j * d + j];
        for k in 0..j {
            diag -= l[j * d + k] * l[j * d + k];
        }
        assert!(
            diag > 0.0,
            "the matrix is not positive definite (pivot {j} is {diag})"
        );
        let ljj = diag.sqrt();
        l[j * d + j] = ljj;
        for i in j + 1..d {
            let mut v = m[i * d + j];
            for k in 0..j {
                v -= l[i * d + k] * l[j * d + k];
            }
            l[i * d + j] = v / ljj;
        }
    }
    // L z = b, then Lᵀ x = z.
    let mut z = vec![0.0f64; d];
    for i in 0..d {
        let mut v = b[i];
        for k in 0..i {
            v -= l[i * d + k] * z[k];
        }
        z[i] = v / l[i * d + i];
    }
    let mut x = vec![0.0f64; d];
    for i in (0..d).rev() {
        let mut v = z[i];
        for k in i + 1..d {
            v -= l[k * d + i] * x[k];
        }
        x[i] = v / l[i * d + i];
    }
    x
}

/// The implicit-ALS objective of one row, in f64 over every item:
/// `Σ_i c_ui (p_ui − x·y_i)² + λ‖x‖²`, with `c = 1, p = 0` for items not stored.
///
/// # Panics
/// If the shapes disagree.
pub fn als_row_objective(
    y: &[f32],
    d: usize,
    cols: &[u32],
    conf: &[f32],
    regularization: f32,
    x: &[f32],
) -> f64 {
    assert_eq!(x.len(), d, "x does not have d features");
    let mut total = 0.0f64;
    for (i, yi) in y.chunks_exact(d).enumerate() {
        let (c, p) = match cols.iter().position(|&c| c as usize == i) {
            Some(k) => (f64::from(conf[k]), 1.0),
            None => (1.0, 0.0),
        };
        let mut s = 0.0f64;
        for k in 0..d {
            s += f64::from(x[k]) * f64::from(yi[k]);
        }
        total += c * (p - s) * (p - s);
    }
    let norm: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    total + f64::from(regularization) * norm
}

/// For every row of `queries` (row-major, `d` features), the `n` rows of `items`
/// with the highest f32 dot product, best first; equal scores go to the lower
/// index, a NaN score ranks as -inf. Items listed in the query's row of `exclude`
/// are skipped; slots left empty hold [`NO_ITEM`] at -inf.
///
/// # Panics
/// If the shapes disagree.
pub fn top_n(queries: &[f32], items: &[f32], d: usize, n: usize, exclude: Option<&Csr>) -> TopN {
    assert!(d >= 1, "d must be at least 1");
    assert_eq!(
        queries.len() % d,
        0,
        "queries are not a whole number of rows"
    );
    assert_eq!(items.len() % d, 0, "items are not a whole number of rows");
    let rank = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
    let mut out = TopN {
        n,
        items: Vec::new(),
        scores: Vec::new(),
    };
    for (q, query) in queries.chunks_exact(d).enumerate() {
        let skip: &[u32] = match exclude {
            Some(ex) => ex.row(q).0,
            None => &[],
        };
        let mut scored: Vec<(f32, u32)> = items
            .chunks_exact(d)
            .enumerate()
            .filter(|(j, _)| !skip.contains(&(*j as u32)))
            .map(|(j, item)| (dot32(query, item), j as u32))
            .collect();
        // Stable sort of items in index order: equal ranks keep the lower index first.
        scored.sort_by(|a, b| rank(b.0).partial_cmp(&rank(a.0)).unwrap());
        for slot in 0..n {
            match scored.get(slot) {
                Some(&(score, item)) => {
                    out.items.push(item);
                    out.scores.push(score);
                }
                None => {
                    out.items.push(NO_ITEM);
                    out.scores.push(f32::NEG_INFINITY);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_assignment() {
        // Point (0, 0); centroids (1, 0), (0, 2), (1, 0), (3, 4).
        let centroids = [1.0, 0.0, 0.0, 2.0, 1.0, 0.0, 3.0, 4.0];
        let got = assign(&[0.0, 0.0], 2, &centroids, 4);
        assert_eq!(
            got,
            vec![Nearest {
                best: 0,
                best_dist: 1.0,
                second: 2,
                second_dist: 1.0
            }]
        );

        // Point (0, 1.5): (0, 2) is nearest at 0.25, then (1, 0) at 3.25.
        let got = assign(&[0.0, 1.5], 2, &centroids, 4);
        assert_eq!(
            got,
            vec![Nearest {
                best: 1,
                best_dist: 0.25,
                second: 0,
                second_dist: 3.25
            }]
        );
    }

    #[test]
    fn single_centroid_has_no_second() {
        let got = assign(&[1.0, 2.0, 3.0], 1, &[2.0], 1);
        let want: Vec<Nearest> = [1.0, 0.0, 1.0]
            .iter()
            .map(|&dist| Nearest {
                best: 0,
                best_dist: dist,
                second: NO_SECOND,
                second_dist: f32::INFINITY,
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn infinite_distances_still_pick_lowest_indices() {
        // (1e20 - -1e20)^2 overflows f32: both centroids are at infinity.
        let got = assign(&[1e20], 1, &[-1e20, -1e20, 1e20], 3);
        assert_eq!(
            got,
            vec![Nearest {
                best: 2,
                best_dist: 0.0,
                second: 0,
                second_dist: f32::INFINITY
            }]
        );
        let got = assign(&[1e20], 1, &[-1e20, -1e20], 2);
        assert_eq!(
            got,
            vec![Nearest {
                best: 0,
                best_dist: f32::INFINITY,
                second: 1,
                second_dist: f32::INFINITY
            }]
        );
    }

    #[test]
    fn hand_computed_partial_sums() {
        let points = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let got = partial_sums(&points, 2, &[1, 0, 1], 3);
        assert_eq!(got.sums, vec![3.0, 4.0, 6.0, 8.0, 0.0, 0.0]);
        assert_eq!(got.counts, vec![1, 2, 0]);
    }
}

#[cfg(test)]
mod als_tests {
    use super::*;

    fn csr(rows: usize, cols: usize, entries: &[(usize, u32, f32)]) -> Csr {
        let mut indptr = vec![0u64; rows + 1];
        for &(r, _, _) in entries {
            indptr[r + 1] += 1;
        }
        for r in 0..rows {
            indptr[r + 1] += indptr[r];
        }
        Csr {
            rows,
            cols,
            indptr,
            indices: entries.iter().map(|e| e.1).collect(),
            values: entries.iter().map(|e| e.2).collect(),
        }
    }

    #[test]
    fn hand_computed_gram() {
        assert_eq!(gram(&[1.0, 2.0, 3.0, 4.0], 2), vec![10.0, 14.0, 14.0, 20.0]);
        assert_eq!(gram(&[], 3), vec![0.0; 9]);
    }

    #[test]
    fn hand_computed_cholesky_solve() {
        // [[4, 2], [2, 3]] x = [2, 1]  =>  x = [0.5, 0].
        let x = cholesky_solve(&[4.0, 2.0, 2.0, 3.0], &[2.0, 1.0]);
        assert!((x[0] - 0.5).abs() < 1e-15 && x[1].abs() < 1e-15, "{x:?}");
        // 3 x 3, checked by multiplying back.
        let m = [6.0, 2.0, 1.0, 2.0, 5.0, 2.0, 1.0, 2.0, 4.0];
        let b = [1.0, -2.0, 3.0];
        let x = cholesky_solve(&m, &b);
        for i in 0..3 {
            let mx: f64 = (0..3).map(|j| m[i * 3 + j] * x[j]).sum();
            assert!((mx - b[i]).abs() < 1e-12, "row {i}: {mx} vs {}", b[i]);
        }
    }

    #[test]
    #[should_panic(expected = "not positive definite")]
    fn cholesky_rejects_indefinite_matrices() {
        cholesky_solve(&[1.0, 2.0, 2.0, 1.0], &[1.0, 1.0]);
    }

    #[test]
    fn hand_computed_one_feature_solve() {
        // d = 1; items y = 1, 2, 3; the row holds item 0 at c = 3 and item 2 at c = 2.
        // (YᵀY + λ + Σ (c - 1) y²) x = Σ c y:  (14 + 0.5 + 2 + 9) x = 3 + 6.
        let y = [1.0, 2.0, 3.0];
        let yty = gram(&y, 1);
        let want = 9.0 / 25.5;
        let exact = als_exact_row(&yty, 0.5, &y, 1, &[0, 2], &[3.0, 2.0]);
        assert!((exact[0] - want).abs() < 1e-15, "{exact:?}");
        // With one feature, one CG step is exact.
        let mut x = [0.7f32];
        als_solve_row(&yty, 0.5, &y, &[0, 2], &[3.0, 2.0], &mut x, 1);
        assert!((f64::from(x[0]) - want).abs() < 1e-6, "{x:?}");
        // And the objective is lowest there.
        let f = |v: f32| als_row_objective(&y, 1, &[0, 2], &[3.0, 2.0], 0.5, &[v]);
        assert!(f(want as f32) < f(want as f32 + 0.01));
        assert!(f(want as f32) < f(want as f32 - 0.01));
    }

    #[test]
    fn hand_computed_objective() {
        // x = 1; items y = 1, 2; the row holds item 0 at c = 3.
        // 3 (1 - 1)² + 1 (0 - 2)² + 0.5 * 1² = 4.5.
        let got = als_row_objective(&[1.0, 2.0], 1, &[0], &[3.0], 0.5, &[1.0]);
        assert_eq!(got, 4.5);
    }

    #[test]
    fn hand_computed_top_n() {
        // Scores of the query (1, 0): 0, 2, 1, 2.
        let items = [0.0, 1.0, 2.0, 0.0, 1.0, 0.0, 2.0, 0.0];
        let got = top_n(&[1.0, 0.0], &items, 2, 3, None);
        assert_eq!(got.items, vec![1, 3, 2]);
        assert_eq!(got.scores, vec![2.0, 2.0, 1.0]);

        let exclude = csr(1, 4, &[(0, 1, 1.0)]);
        let got = top_n(&[1.0, 0.0], &items, 2, 5, Some(&exclude));
        assert_eq!(got.items, vec![3, 2, 0, NO_ITEM, NO_ITEM]);
        assert_eq!(
            got.scores,
            vec![2.0, 1.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]
        );
    }
}
