//! Choosing the number of segments with evidence: for every candidate k, the
//! inertia of its best fit (all users) and, on a seeded sample of users, the
//! silhouette, Davies–Bouldin and Calinski–Harabasz indices and the stability (mean
//! adjusted Rand index between k-means refits on seeded half-samples); then the
//! rule. Pure math on the sample, no I/O.

use crate::kmeans;
use serde::Serialize;
use shoal_spec::hash;

/// Stability at or above this counts as stable.
pub const STABLE: f64 = 0.8;
/// The rule, in words (README, report).
pub const RULE: &str = "the highest silhouette among the k whose stability is at least 0.8; when no k is that stable, the most stable k (ties: the smaller k)";
/// Pairs of half-samples refitted per k.
pub const STABILITY_PAIRS: u32 = 3;
/// Seeded k-means++ starts per refit.
const REFIT_STARTS: usize = 3;

/// One candidate's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KMetrics {
    pub k: u32,
    /// Of the best start, over every user (scaled space).
    pub inertia: f64,
    /// The final inertia of every start, in start order.
    pub start_inertia: Vec<f64>,
    pub silhouette: Option<f64>,
    pub davies_bouldin: Option<f64>,
    pub calinski_harabasz: Option<f64>,
    pub stability: Option<f64>,
}

/// How k was chosen: every candidate's figures, the chosen k and the rule.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KChoiceFacts {
    pub candidates: Vec<KMetrics>,
    pub chosen: u32,
    pub rule: &'static str,
    /// Users in the sample the indices and the stability are measured on.
    pub sample: usize,
    pub stability_pairs: u32,
}

/// Each sample point's nearest centroid.
pub fn labels(points: &[f32], d: usize, centroids: &[f32]) -> Vec<u32> {
    points
        .chunks_exact(d)
        .map(|p| kmeans::nearest(p, centroids, d).0 as u32)
        .collect()
}

/// Silhouette, Davies–Bouldin and Calinski–Harabasz of the sample `points`
/// (row-major, `d` values each) labelled by their nearest of `centroids` (`k`).
pub fn sample_indices(
    points: &[f32],
    d: usize,
    centroids: &[f32],
    k: usize,
) -> (Option<f64>, Option<f64>, Option<f64>) {
    let labels = labels(points, d, centroids);
    let mut sizes = vec![0u64; k];
    let mut means = vec![0.0f64; k * d];
    let mut scatter = vec![0.0f64; k];
    for (p, &l) in points.chunks_exact(d).zip(&labels) {
        let c = l as usize;
        sizes[c] += 1;
        for (m, &x) in means[c * d..(c + 1) * d].iter_mut().zip(p) {
            *m += f64::from(x);
        }
        scatter[c] += kmeans::sq_dist(p, &centroids[c * d..(c + 1) * d]).sqrt();
    }
    for c in 0..k {
        if sizes[c] > 0 {
            let n = sizes[c] as f64;
            means[c * d..(c + 1) * d].iter_mut().for_each(|m| *m /= n);
            scatter[c] /= n;
        }
    }
    let within: f64 = points
        .chunks_exact(d)
        .zip(&labels)
        .map(|(p, &l)| {
            let m = &means[l as usize * d..(l as usize + 1) * d];
            p.iter()
                .zip(m)
                .map(|(&x, &m)| (f64::from(x) - m).powi(2))
                .sum::<f64>()
        })
        .sum();
    (
        kmeans::silhouette(points, d, &labels, k),
        kmeans::davies_bouldin(centroids, d, &scatter, &sizes),
        kmeans::calinski_harabasz(&means, d, &sizes, within),
    )
}

/// Stability of k on the sample: for each of `pairs` seeded splits into two
/// halves, k-means is fitted on each half (seeded k-means++ and Lloyd), every
/// sample point is labelled by both fits, and the two labellings are compared by
/// the adjusted Rand index; the mean over the pairs. `None` when a half has fewer
/// than k points.
pub fn stability(points: &[f32], d: usize, k: usize, seed: u64, pairs: u32) -> Option<f64> {
    let n = points.len() / d;
    let mut total = 0.0;
    for pair in 0..pairs {
        let mut halves: [Vec<f32>; 2] = [Vec::new(), Vec::new()];
        for (i, p) in points.chunks_exact(d).enumerate() {
            let side = hash::key(seed, &[0x57ab, u64::from(pair), i as u64]) & 1;
            halves[side as usize].extend_from_slice(p);
        }
        let fits: Vec<Vec<f32>> = halves
            .iter()
            .enumerate()
            .map(|(h, half)| {
                let m = half.len() / d;
                if m < k {
                    return None;
                }
                let refit_seed = hash::key(seed, &[0x5eed, u64::from(pair), h as u64]);
                Some(kmeans::recluster(
                    half,
                    d,
                    &vec![1.0; m],
                    k,
                    refit_seed,
                    REFIT_STARTS,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        let a = labels(points, d, &fits[0]);
        let b = labels(points, d, &fits[1]);
        debug_assert_eq!(a.len(), n);
        total += adjusted_rand_index(&a, &b);
    }
    (pairs > 0).then(|| total / f64::from(pairs))
}

/// Adjusted Rand index of two labellings of the same points (Hubert and Arabie):
/// 1 for the same partition, about 0 for independent ones.
pub fn adjusted_rand_index(a: &[u32], b: &[u32]) -> f64 {
    assert_eq!(a.len(), b.len(), "two labellings of the same points");
    let ka = a.iter().max().map_or(0, |&m| m as usize + 1);
    let kb = b.iter().max().map_or(0, |&m| m as usize + 1);
    let mut table = vec![0u64; ka * kb];
    let (mut rows, mut cols) = (vec![0u64; ka], vec![0u64; kb]);
    for (&x, &y) in a.iter().zip(b) {
        table[x as usize * kb + y as usize] += 1;
        rows[x as usize] += 1;
        cols[y as usize] += 1;
    }
    let pairs = |v: u64| (v as f64) * (v as f64 - 1.0) / 2.0;
    let index: f64 = table.iter().map(|&v| pairs(v)).sum();
    let sa: f64 = rows.iter().map(|&v| pairs(v)).sum();
    let sb: f64 = cols.iter().map(|&v| pairs(v)).sum();
    let all = pairs(a.len() as u64);
    if all == 0.0 {
        return 1.0;
    }
    let expected = sa * sb / all;
    let max = (sa + sb) / 2.0;
    if max == expected {
        return 1.0;
    }
    (index - expected) / (max - expected)
}

/// The index of the candidate the rule picks (see [`RULE`]); `rows` ascending in k.
pub fn choose(rows: &[KMetrics]) -> usize {
    let stable = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.stability.is_some_and(|s| s >= STABLE))
        .filter_map(|(i, r)| r.silhouette.map(|s| (i, s)))
        .fold(None, |best: Option<(usize, f64)>, (i, s)| match best {
            Some((_, b)) if b >= s => best,
            _ => Some((i, s)),
        });
    if let Some((i, _)) = stable {
        return i;
    }
    rows.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, r)| {
            let s = r.stability.unwrap_or(f64::NEG_INFINITY);
            if s > best.1 { (i, s) } else { best }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `per` points around each of `centers` (2-D), a fixed spread.
    fn blobs(centers: &[(f32, f32)], per: usize, spread: f32) -> Vec<f32> {
        let mut out = Vec::new();
        for (c, &(x, y)) in centers.iter().enumerate() {
            for i in 0..per {
                let u = hash::unit(hash::key(7, &[c as u64, i as u64, 0])) as f32 - 0.5;
                let v = hash::unit(hash::key(7, &[c as u64, i as u64, 1])) as f32 - 0.5;
                out.extend([x + spread * u, y + spread * v]);
            }
        }
        out
    }

    #[test]
    fn ari_of_known_labellings() {
        assert_eq!(adjusted_rand_index(&[0, 0, 1, 1], &[1, 1, 0, 0]), 1.0);
        let ari = adjusted_rand_index(&[0, 0, 1, 1], &[0, 1, 0, 1]);
        assert!((ari - -0.5).abs() < 1e-12, "{ari}");
        // scikit-learn: adjusted_rand_score([0,0,1,2],[0,0,1,1]) = 0.5714...
        let ari = adjusted_rand_index(&[0, 0, 1, 2], &[0, 0, 1, 1]);
        assert!((ari - 0.571_428_571_428_571_4).abs() < 1e-12, "{ari}");
    }

    #[test]
    fn four_separate_blobs_choose_four() {
        let centers = [(0.0, 0.0), (10.0, 0.0), (0.0, 10.0), (10.0, 10.0)];
        let pts = blobs(&centers, 150, 2.0);
        let rows: Vec<KMetrics> = (2..=7)
            .map(|k| {
                let c = kmeans::recluster(&pts, 2, &vec![1.0; 600], k, 3, 4);
                let (s, db, ch) = sample_indices(&pts, 2, &c, k);
                KMetrics {
                    k: k as u32,
                    inertia: 0.0,
                    start_inertia: Vec::new(),
                    silhouette: s,
                    davies_bouldin: db,
                    calinski_harabasz: ch,
                    stability: stability(&pts, 2, k, 11, 3),
                }
            })
            .collect();
        let four = &rows[2];
        assert!(four.stability.unwrap() > 0.95, "{rows:?}");
        assert!(four.silhouette.unwrap() > 0.7, "{rows:?}");
        assert_eq!(rows[choose(&rows)].k, 4, "{rows:?}");
    }

    #[test]
    fn the_rule_falls_back_to_the_most_stable() {
        let row = |k, s, st| KMetrics {
            k,
            inertia: 0.0,
            start_inertia: Vec::new(),
            silhouette: Some(s),
            davies_bouldin: None,
            calinski_harabasz: None,
            stability: Some(st),
        };
        // stable ones: the best silhouette among them, not overall
        let rows = [row(2, 0.9, 0.5), row(3, 0.6, 0.85), row(4, 0.7, 0.9)];
        assert_eq!(choose(&rows), 2);
        // none stable: the most stable; ties to the smaller k
        let rows = [row(2, 0.9, 0.5), row(3, 0.6, 0.7), row(4, 0.7, 0.7)];
        assert_eq!(choose(&rows), 1);
    }
}
