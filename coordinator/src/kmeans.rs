//! The coordinator's side of distributed k-means: merging the workers' partial
//! results in shard order, the weighted k-means++ that finishes k-means||
//! initialisation, empty-cluster re-seeding, and the quality metrics. Everything here
//! is deterministic for a given seed and input order.

use rayon::prelude::*;
use shoal_proto::pb;
use shoal_spec::hash;

/// Global mean and scale (population standard deviation; 1 where it is 0) merged
/// from per-shard moments in the order given (Chan et al.).
pub fn merge_moments(per_shard: &[Vec<pb::Moments>], dims: usize) -> (Vec<f64>, Vec<f64>, u64) {
    let total = merged(per_shard, dims);
    let count = total.first().map(|t| t.count).unwrap_or(0);
    let mean = total.iter().map(|t| t.mean).collect();
    let scale = total
        .iter()
        .map(|t| {
            let sd = variance(t).sqrt();
            if sd > 1e-12 { sd } else { 1.0 }
        })
        .collect();
    (mean, scale, count)
}

/// The population variance of every feature, from per-shard moments.
pub fn merge_variances(per_shard: &[Vec<pb::Moments>], dims: usize) -> Vec<f64> {
    merged(per_shard, dims).iter().map(variance).collect()
}

fn variance(t: &pb::Moments) -> f64 {
    if t.count > 0 {
        (t.m2 / t.count as f64).max(0.0)
    } else {
        0.0
    }
}

/// Chan et al.'s merge of per-shard moments, in shard order.
fn merged(per_shard: &[Vec<pb::Moments>], dims: usize) -> Vec<pb::Moments> {
    let mut total = vec![pb::Moments::default(); dims];
    for shard in per_shard {
        for (t, m) in total.iter_mut().zip(shard) {
            if m.count == 0 {
                continue;
            }
            if t.count == 0 {
                *t = *m;
                continue;
            }
            let n = (t.count + m.count) as f64;
            let delta = m.mean - t.mean;
            t.m2 += m.m2 + delta * delta * (t.count as f64) * (m.count as f64) / n;
            t.mean += delta * m.count as f64 / n;
            t.count += m.count;
        }
    }
    total
}

pub fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum()
}

/// A seeded stream of uniform numbers in [0, 1).
struct Draws {
    seed: u64,
    n: u64,
}

impl Draws {
    fn new(seed: u64, stream: u64) -> Self {
        Draws {
            seed: hash::key(seed, &[stream]),
            n: 0,
        }
    }
    fn next(&mut self) -> f64 {
        self.n += 1;
        hash::unit(hash::key(self.seed, &[self.n]))
    }
}

/// Index drawn with probability proportional to `weights` (all >= 0).
fn draw(weights: &[f64], u: f64) -> usize {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return (u * weights.len() as f64) as usize % weights.len().max(1);
    }
    let target = u * total;
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if acc > target {
            return i;
        }
    }
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0)
}

/// Greedy weighted k-means++ (as scikit-learn: 2 + ln k trials per step, keep the
/// one that lowers the weighted potential most). `points` is row-major `n x d`.
pub fn kmeans_pp(
    points: &[f32],
    d: usize,
    weights: &[f64],
    k: usize,
    draws_seed: u64,
    stream: u64,
) -> Vec<usize> {
    let n = weights.len();
    let mut rng = Draws::new(draws_seed, stream);
    let trials = 2 + (k as f64).ln().floor() as usize;
    let row = |i: usize| &points[i * d..(i + 1) * d];
    let first = draw(weights, rng.next());
    let mut chosen = vec![first];
    let mut closest: Vec<f64> = (0..n).map(|i| sq_dist(row(i), row(first))).collect();
    while chosen.len() < k {
        let pot: Vec<f64> = closest.iter().zip(weights).map(|(c, w)| c * w).collect();
        let mut best: Option<(f64, usize, Vec<f64>)> = None;
        for _ in 0..trials {
            let cand = draw(&pot, rng.next());
            let next: Vec<f64> = (0..n)
                .map(|i| closest[i].min(sq_dist(row(i), row(cand))))
                .collect();
            let potential: f64 = next.iter().zip(weights).map(|(c, w)| c * w).sum();
            if best.as_ref().is_none_or(|b| potential < b.0) {
                best = Some((potential, cand, next));
            }
        }
        let (_, cand, next) = best.expect("at least one trial");
        chosen.push(cand);
        closest = next;
    }
    chosen
}

/// Weighted Lloyd on a small candidate set; returns the centers and weighted cost.
pub fn local_lloyd(
    points: &[f32],
    d: usize,
    weights: &[f64],
    mut centers: Vec<f32>,
    max_iter: usize,
) -> (Vec<f32>, f64) {
    let n = weights.len();
    let k = centers.len() / d;
    let mut cost = f64::INFINITY;
    for _ in 0..max_iter {
        let mut sums = vec![0.0f64; k * d];
        let mut wsum = vec![0.0f64; k];
        let mut new_cost = 0.0;
        for i in 0..n {
            let p = &points[i * d..(i + 1) * d];
            let (best, dist) = nearest(p, &centers, d);
            new_cost += weights[i] * dist;
            wsum[best] += weights[i];
            for j in 0..d {
                sums[best * d + j] += weights[i] * f64::from(p[j]);
            }
        }
        for c in 0..k {
            if wsum[c] > 0.0 {
                for j in 0..d {
                    centers[c * d + j] = (sums[c * d + j] / wsum[c]) as f32;
                }
            }
        }
        let done = new_cost >= cost * (1.0 - 1e-9);
        cost = new_cost;
        if done {
            break;
        }
    }
    (centers, cost)
}

/// Nearest center (lowest index on ties) and its squared distance.
pub fn nearest(p: &[f32], centers: &[f32], d: usize) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (c, center) in centers.chunks_exact(d).enumerate() {
        let dist = sq_dist(p, center);
        if dist < best.1 {
            best = (c, dist);
        }
    }
    best
}

/// Reduces k-means|| candidates to k centers: several seeded weighted k-means++
/// starts, each refined by weighted Lloyd on the candidates; the lowest weighted
/// cost wins.
pub fn recluster(
    candidates: &[f32],
    d: usize,
    weights: &[f64],
    k: usize,
    seed: u64,
    starts: usize,
) -> Vec<f32> {
    let mut best: Option<(f64, Vec<f32>)> = None;
    for start in 0..starts.max(1) {
        let idx = kmeans_pp(candidates, d, weights, k, seed, start as u64);
        let centers: Vec<f32> = idx
            .iter()
            .flat_map(|&i| candidates[i * d..(i + 1) * d].iter().copied())
            .collect();
        let (centers, cost) = local_lloyd(candidates, d, weights, centers, 100);
        if best.as_ref().is_none_or(|b| cost < b.0) {
            best = Some((cost, centers));
        }
    }
    best.expect("at least one start").1
}

/// The merged result of one Lloyd round.
#[derive(Debug, Clone)]
pub struct Round {
    pub centroids: Vec<f32>,
    pub counts: Vec<u64>,
    /// Sum of squared distances to the centroids that were broadcast.
    pub inertia: f64,
    /// Squared shift of the centroids, summed over clusters.
    pub shift: f64,
    /// Clusters that were empty and re-seeded from far points.
    pub reseeded: Vec<usize>,
}

/// Merges the partials of one round (they must come in shard order), computes the
/// new centroids and re-seeds empty clusters with the farthest points (taken from
/// the largest-distance candidates, whose old clusters give them up).
pub fn merge_round(old: &[f32], k: usize, d: usize, partials: &[pb::ShardPartial]) -> Round {
    let mut sums = vec![0.0f64; k * d];
    let mut counts = vec![0u64; k];
    let mut inertia = 0.0;
    let mut far: Vec<&pb::FarPoint> = Vec::new();
    for p in partials {
        for (a, b) in sums.iter_mut().zip(&p.sums) {
            *a += *b;
        }
        for (a, b) in counts.iter_mut().zip(&p.counts) {
            *a += *b;
        }
        inertia += p.inertia;
        far.extend(p.far.iter());
    }
    far.sort_by(|a, b| {
        b.distance.total_cmp(&a.distance).then_with(|| {
            let (pa, pb) = (a.point.unwrap_or_default(), b.point.unwrap_or_default());
            (pa.shard, pa.index).cmp(&(pb.shard, pb.index))
        })
    });
    let mut reseeded = Vec::new();
    let mut far_iter = far.into_iter();
    for c in 0..k {
        if counts[c] > 0 {
            continue;
        }
        // the farthest point whose cluster can spare it
        for fp in far_iter.by_ref() {
            let donor = fp.label as usize;
            if donor >= k || counts[donor] <= 1 || fp.values.len() != d {
                continue;
            }
            counts[donor] -= 1;
            for j in 0..d {
                sums[donor * d + j] -= f64::from(fp.values[j]);
                sums[c * d + j] = f64::from(fp.values[j]);
            }
            counts[c] = 1;
            reseeded.push(c);
            break;
        }
    }
    let mut centroids = old.to_vec();
    for c in 0..k {
        if counts[c] > 0 {
            for j in 0..d {
                centroids[c * d + j] = (sums[c * d + j] / counts[c] as f64) as f32;
            }
        }
    }
    let shift = old
        .chunks_exact(d)
        .zip(centroids.chunks_exact(d))
        .map(|(a, b)| sq_dist(a, b))
        .sum();
    Round {
        centroids,
        counts,
        inertia,
        shift,
        reseeded,
    }
}

/// Sample rows per parallel work item of [`silhouette`].
const SILHOUETTE_ROWS: usize = 64;
/// Sample columns per `dgemm` of [`silhouette`] (a 64 x 1024 block of inner
/// products, 512 KiB, stays in cache while it is turned into distances).
const SILHOUETTE_COLS: usize = 1024;

/// Mean silhouette of a sample (Euclidean). Points in singleton clusters score 0, as
/// in scikit-learn. `None` when fewer than two clusters are present.
///
/// The pairwise distances come from blocks of inner products (`dgemm` on an f64
/// copy): `‖p − q‖ = sqrt(‖p‖² + ‖q‖² − 2 p·q)`, clamped at 0, a point's distance
/// to itself 0. Each point's sums run over the sample in order and the points'
/// scores are added in order, so the result does not depend on the threads.
pub fn silhouette(points: &[f32], d: usize, labels: &[u32], k: usize) -> Option<f64> {
    let n = labels.len();
    let mut sizes = vec![0usize; k];
    for &l in labels {
        sizes[l as usize] += 1;
    }
    if sizes.iter().filter(|s| **s > 0).count() < 2 {
        return None;
    }
    let wide: Vec<f64> = points[..n * d].iter().map(|&v| f64::from(v)).collect();
    let norms: Vec<f64> = wide
        .chunks_exact(d)
        .map(|p| p.iter().map(|v| v * v).sum())
        .collect();
    let scores: Vec<Vec<f64>> = (0..n.div_ceil(SILHOUETTE_ROWS))
        .into_par_iter()
        .map(|t| {
            let rows = t * SILHOUETTE_ROWS..((t + 1) * SILHOUETTE_ROWS).min(n);
            let m = rows.len();
            // per row of the tile, the sum of its distances to each cluster
            let mut sums = vec![0.0f64; m * k];
            let mut inner = vec![0.0f64; m * SILHOUETTE_COLS];
            for c0 in (0..n).step_by(SILHOUETTE_COLS) {
                let cols = c0..(c0 + SILHOUETTE_COLS).min(n);
                let w = cols.len();
                // SAFETY: dgemm reads A = the tile's rows of `wide` (m x d, strides
                // (d, 1), inside rows.end * d <= wide.len()), B = the columns'
                // rows of `wide` transposed (d x w, strides (1, d): element (a, j)
                // at (c0 + j) * d + a < cols.end * d <= wide.len()), and writes C =
                // `inner` (m x w, strides (SILHOUETTE_COLS, 1), last element
                // (m-1) * SILHOUETTE_COLS + w - 1 < inner.len()); beta = 0.
                unsafe {
                    matrixmultiply::dgemm(
                        m,
                        d,
                        w,
                        1.0,
                        wide[rows.start * d..].as_ptr(),
                        d as isize,
                        1,
                        wide[c0 * d..].as_ptr(),
                        1,
                        d as isize,
                        0.0,
                        inner.as_mut_ptr(),
                        SILHOUETTE_COLS as isize,
                        1,
                    );
                }
                for (r, i) in rows.clone().enumerate() {
                    let sum = &mut sums[r * k..(r + 1) * k];
                    for (jj, j) in cols.clone().enumerate() {
                        let sq = norms[i] + norms[j] - 2.0 * inner[r * SILHOUETTE_COLS + jj];
                        let dist = if i == j { 0.0 } else { sq.max(0.0).sqrt() };
                        sum[labels[j] as usize] += dist;
                    }
                }
            }
            rows.enumerate()
                .map(|(r, i)| {
                    let own = labels[i] as usize;
                    if sizes[own] <= 1 {
                        return 0.0;
                    }
                    let sum = &sums[r * k..(r + 1) * k];
                    let a = sum[own] / (sizes[own] - 1) as f64;
                    let b = (0..k)
                        .filter(|&c| c != own && sizes[c] > 0)
                        .map(|c| sum[c] / sizes[c] as f64)
                        .fold(f64::INFINITY, f64::min);
                    let m = a.max(b);
                    if m > 0.0 { (b - a) / m } else { 0.0 }
                })
                .collect()
        })
        .collect();
    let total: f64 = scores.iter().flatten().sum();
    Some(total / n as f64)
}

/// Davies–Bouldin index from cluster centers and mean member-to-center distances.
pub fn davies_bouldin(centers: &[f32], d: usize, scatter: &[f64], sizes: &[u64]) -> Option<f64> {
    let live: Vec<usize> = (0..sizes.len()).filter(|&c| sizes[c] > 0).collect();
    if live.len() < 2 {
        return None;
    }
    let mut total = 0.0;
    for &i in &live {
        let mut worst: f64 = 0.0;
        for &j in &live {
            if i == j {
                continue;
            }
            let sep = sq_dist(&centers[i * d..(i + 1) * d], &centers[j * d..(j + 1) * d]).sqrt();
            let r = if sep > 0.0 {
                (scatter[i] + scatter[j]) / sep
            } else {
                f64::INFINITY
            };
            worst = worst.max(r);
        }
        total += worst;
    }
    Some(total / live.len() as f64)
}

/// Calinski–Harabasz index: between-cluster over within-cluster dispersion, each
/// divided by its degrees of freedom. `means` are the clusters' member means.
pub fn calinski_harabasz(means: &[f64], d: usize, sizes: &[u64], within: f64) -> Option<f64> {
    let n: u64 = sizes.iter().sum();
    let k = sizes.iter().filter(|s| **s > 0).count() as u64;
    if k < 2 || n <= k {
        return None;
    }
    let mut overall = vec![0.0f64; d];
    for (c, &s) in sizes.iter().enumerate() {
        for j in 0..d {
            overall[j] += means[c * d + j] * s as f64;
        }
    }
    overall.iter_mut().for_each(|x| *x /= n as f64);
    let between: f64 = sizes
        .iter()
        .enumerate()
        .map(|(c, &s)| {
            s as f64
                * (0..d)
                    .map(|j| (means[c * d + j] - overall[j]).powi(2))
                    .sum::<f64>()
        })
        .sum();
    if within <= 0.0 {
        return None;
    }
    Some((between / (k - 1) as f64) / (within / (n - k) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(v: &[[f32; 2]]) -> Vec<f32> {
        v.iter().flatten().copied().collect()
    }

    /// Brute force: the exact optimum over all labelings of a tiny set.
    fn brute_force_cost(points: &[f32], d: usize, k: usize) -> f64 {
        let n = points.len() / d;
        let mut best = f64::INFINITY;
        let total = (k as u64).pow(n as u32);
        for code in 0..total {
            let mut labels = vec![0usize; n];
            let mut c = code;
            for l in labels.iter_mut() {
                *l = (c % k as u64) as usize;
                c /= k as u64;
            }
            let mut cost = 0.0;
            for cl in 0..k {
                let members: Vec<usize> = (0..n).filter(|&i| labels[i] == cl).collect();
                if members.is_empty() {
                    continue;
                }
                for j in 0..d {
                    let mean = members
                        .iter()
                        .map(|&i| f64::from(points[i * d + j]))
                        .sum::<f64>()
                        / members.len() as f64;
                    cost += members
                        .iter()
                        .map(|&i| (f64::from(points[i * d + j]) - mean).powi(2))
                        .sum::<f64>();
                }
            }
            best = best.min(cost);
        }
        best
    }

    #[test]
    fn recluster_finds_the_brute_force_optimum() {
        let p = pts(&[
            [0.0, 0.0],
            [0.2, 0.1],
            [5.0, 5.0],
            [5.1, 4.8],
            [9.0, 0.0],
            [9.3, 0.2],
            [4.0, 9.0],
        ]);
        let w = vec![1.0; 7];
        let centers = recluster(&p, 2, &w, 3, 42, 10);
        let cost: f64 = p.chunks_exact(2).map(|x| nearest(x, &centers, 2).1).sum();
        let optimum = brute_force_cost(&p, 2, 3);
        assert!(
            (cost - optimum).abs() <= 1e-4 * optimum.max(1.0),
            "cost {cost} optimum {optimum}"
        );
    }

    #[test]
    fn kmeans_pp_is_seeded_and_distinct() {
        let p = pts(&[
            [0.0, 0.0],
            [1.0, 0.0],
            [10.0, 0.0],
            [11.0, 0.0],
            [20.0, 0.0],
        ]);
        let w = vec![1.0; 5];
        let a = kmeans_pp(&p, 2, &w, 3, 7, 0);
        assert_eq!(a, kmeans_pp(&p, 2, &w, 3, 7, 0));
        let mut s = a.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn merge_round_matches_direct_means_and_reseeds() {
        // two shards; cluster 2 empty -> takes the farthest point (from cluster 0)
        let old = vec![0.0f32, 0.0, 10.0, 10.0, 100.0, 100.0];
        let shard =
            |s: u32, sums: Vec<f64>, counts: Vec<u64>, far: Vec<pb::FarPoint>| pb::ShardPartial {
                shard: s,
                fit: 0,
                sums,
                counts,
                inertia: 1.0,
                far,
            };
        let fp = |s: u32, i: u64, label: u32, dist: f64, v: [f32; 2]| pb::FarPoint {
            point: Some(pb::PointRef { shard: s, index: i }),
            label,
            distance: dist,
            values: v.to_vec(),
        };
        let parts = vec![
            shard(
                0,
                vec![1.0, 1.0, 20.0, 20.0, 0.0, 0.0],
                vec![2, 2, 0],
                vec![fp(0, 1, 0, 2.0, [1.0, 1.0])],
            ),
            shard(
                1,
                vec![3.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                vec![1, 0, 0],
                vec![fp(1, 0, 0, 9.0, [3.0, 0.0])],
            ),
        ];
        let r = merge_round(&old, 3, 2, &parts);
        assert_eq!(r.reseeded, vec![2]);
        assert_eq!(r.counts, vec![2, 2, 1]);
        assert_eq!(&r.centroids[4..6], &[3.0, 0.0]);
        // cluster 0 lost (3, 0): (1+3-3, 1+0-0)/2
        assert_eq!(&r.centroids[0..2], &[0.5, 0.5]);
        assert_eq!(&r.centroids[2..4], &[10.0, 10.0]);
        assert_eq!(r.inertia, 2.0);
    }

    #[test]
    fn moments_merge_like_one_pass() {
        let xs: Vec<f64> = (0..100)
            .map(|i| (i as f64 * 0.37).sin() * 5.0 + 2.0)
            .collect();
        let one = |v: &[f64]| {
            let mut m = pb::Moments::default();
            for x in v {
                m.count += 1;
                let delta = x - m.mean;
                m.mean += delta / m.count as f64;
                m.m2 += delta * (x - m.mean);
            }
            m
        };
        let parts = vec![
            vec![one(&xs[..30])],
            vec![one(&xs[30..31])],
            vec![pb::Moments::default()],
            vec![one(&xs[31..])],
        ];
        let (mean, scale, n) = merge_moments(&parts, 1);
        let mu = xs.iter().sum::<f64>() / 100.0;
        let sd = (xs.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / 100.0).sqrt();
        assert_eq!(n, 100);
        assert!((mean[0] - mu).abs() < 1e-12 && (scale[0] - sd).abs() < 1e-12);
    }

    #[test]
    fn metrics_against_hand_values() {
        // two tight clusters on a line: {0, 1} and {10, 11}
        let p = vec![0.0f32, 1.0, 10.0, 11.0];
        let labels = vec![0, 0, 1, 1];
        let s = silhouette(&p, 1, &labels, 2).unwrap();
        // point 0: a = 1, b = (10 + 11)/2 = 10.5 -> 0.904761...
        let s0 = (10.5 - 1.0) / 10.5;
        let s1 = (9.5 - 1.0) / 9.5;
        assert!((s - (s0 + s1) / 2.0).abs() < 1e-9, "{s}");
        let db = davies_bouldin(&[0.5, 10.5], 1, &[0.5, 0.5], &[2, 2]).unwrap();
        assert!((db - 0.1).abs() < 1e-9);
        // between = 2*25 + 2*25 = 100, within = 4 * 0.25 = 1 -> (100/1)/(1/2) = 200
        let ch = calinski_harabasz(&[0.5, 10.5], 1, &[2, 2], 1.0).unwrap();
        assert!((ch - 200.0).abs() < 1e-9);
        assert_eq!(silhouette(&p, 1, &[0, 0, 0, 0], 2), None);
    }

    /// The silhouette by its definition, one distance at a time.
    fn silhouette_by_definition(points: &[f32], d: usize, labels: &[u32], k: usize) -> f64 {
        let n = labels.len();
        let mut sizes = vec![0usize; k];
        for &l in labels {
            sizes[l as usize] += 1;
        }
        let mut total = 0.0;
        for i in 0..n {
            let own = labels[i] as usize;
            if sizes[own] <= 1 {
                continue;
            }
            let mut sum = vec![0.0f64; k];
            for j in 0..n {
                sum[labels[j] as usize] +=
                    sq_dist(&points[i * d..(i + 1) * d], &points[j * d..(j + 1) * d]).sqrt();
            }
            let a = sum[own] / (sizes[own] - 1) as f64;
            let b = (0..k)
                .filter(|&c| c != own && sizes[c] > 0)
                .map(|c| sum[c] / sizes[c] as f64)
                .fold(f64::INFINITY, f64::min);
            total += (b - a) / a.max(b);
        }
        total / n as f64
    }

    #[test]
    fn silhouette_matches_its_definition() {
        // three blobs in 7 dimensions, 1,500 points (more than one block of rows
        // and of columns), one singleton cluster, duplicate points, an empty cluster
        let (n, d, k) = (1_500usize, 7usize, 5usize);
        let mut state = 11u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) as f32
        };
        let mut points = Vec::with_capacity(n * d);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let c = (i % 3) as u32;
            for _ in 0..d {
                points.push(10.0 * c as f32 + next());
            }
            labels.push(c);
        }
        labels[7] = 3; // a singleton
        let dup: Vec<f32> = points[..d].to_vec();
        points[d..2 * d].copy_from_slice(&dup);
        let got = silhouette(&points, d, &labels, k).unwrap();
        let want = silhouette_by_definition(&points, d, &labels, k);
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!(got > 0.5, "{got}");
    }
}
