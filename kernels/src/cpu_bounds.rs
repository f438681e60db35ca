//! Lloyd rounds that skip the points whose nearest centroid cannot have changed
//! (Hamerly, "Making k-means even faster", SDM 2010), with certificates that hold
//! for the distances the kernel actually computes, so that every label is exactly
//! the one a full [`Backend::assign`](crate::Backend::assign) pass would give.
//!
//! Per point the state keeps its label `a`, an upper bound `u` on its distance to
//! centroid `a` and a lower bound `l` on its distance to every other centroid
//! (true Euclidean distances, not squared). When the centroids move, `u` grows by
//! the drift of centroid `a` and `l` shrinks by the largest drift of the others.
//! A point keeps its label without any distance computed when
//!
//! ```text
//!     u² + 2δ < L²,   L = max(l, 2·s(a) − u),
//! ```
//!
//! where `s(a)` is half the distance from centroid `a` to its nearest other
//! centroid (so `2·s(a) − u` bounds the distance to any other centroid by the
//! triangle inequality) and `δ` bounds the rounding error of one squared distance
//! as the kernel computes it. Then the kernel's value for `a` is below its value
//! for every other centroid, strictly, so a full pass would pick `a` as well, ties
//! included. The other points are gathered and go through the full kernel, which
//! also refreshes their bounds from its best and second best.
//!
//! The rounding bound: the kernel computes `(‖x'‖² − 2x'·c' + ‖c'‖²)` with `x' =
//! x − s`, `c' = c − s` (s the f32 mean of the centroids) by chains of at most `d`
//! f32 FMAs, plus the rounding of the shifts and three more operations. Its error
//! is below `(d + 8) · 2⁻²⁴ · (‖x − s‖ + ‖c − s‖)²` (the direct forms' is
//! smaller); `δ` takes twice that, with `‖x − s‖ ≤ u + R` and `‖c − s‖ ≤ R`, `R` the
//! largest distance of a centroid to `s`. Bounds are f32, and every f32 step
//! that updates them is followed by a relative slack outwards ([`UP`], [`DOWN`]),
//! wider than its rounding.

use rayon::prelude::*;

use crate::cpu::{HostPoints, NAME, assign_rows};
use crate::cpu_als::{storage, storage_mut};
use crate::{KernelError, LabelStats, Nearest, Resident, check};

/// Points per work item of the bound pass.
const CHUNK: usize = 1 << 14;

/// Per-point bounds carried from one Lloyd round to the next.
pub(crate) struct Bounds {
    n: usize,
    labels: Vec<u32>,
    upper: Vec<f32>,
    lower: Vec<f32>,
    /// The centroids of the previous round (`k x d`), empty before the first.
    previous: Vec<f32>,
}

impl Bounds {
    pub(crate) fn new(n: usize) -> Bounds {
        Bounds {
            n,
            labels: Vec::new(),
            upper: Vec::new(),
            lower: Vec::new(),
            previous: Vec::new(),
        }
    }
}

/// Relative rounding slack of a few f32 operations: values that must stay upper
/// bounds are multiplied by [`UP`], lower bounds by [`DOWN`].
const UP: f32 = 1.0 + 8.0 * f32::EPSILON;
const DOWN: f32 = 1.0 - 8.0 * f32::EPSILON;
/// Relative slack of an f64 distance of a few hundred terms.
const F64_SLACK: f64 = 1e-12;

/// Per-centroid figures of one round, rounded outwards to f32.
struct Geometry {
    /// How far every centroid moved since the previous round.
    drift: Vec<f32>,
    /// The largest drift, its centroid, and the second largest.
    max_drift: (f32, usize, f32),
    /// Half the distance from every centroid to its nearest other centroid
    /// (rounded down).
    half_gap: Vec<f32>,
    /// `2R`: twice the largest distance of a centroid to the kernel's shift.
    two_radius: f32,
    /// `γ`: the relative error of the kernel's squared distances is below
    /// `γ / 2`; `δ = γ (u + 2R)²`.
    gamma: f32,
}

/// `v` rounded up to an f32.
fn up(v: f64) -> f32 {
    let f = v as f32;
    if f64::from(f) < v { f.next_up() } else { f }
}

/// `v` rounded down to an f32 (and at least 0).
fn down(v: f64) -> f32 {
    let f = v.max(0.0) as f32;
    if f64::from(f) > v {
        f.next_down().max(0.0)
    } else {
        f
    }
}

fn dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let t = f64::from(x) - f64::from(y);
            t * t
        })
        .sum::<f64>()
        .sqrt()
}

fn geometry(centroids: &[f32], previous: &[f32], d: usize, k: usize) -> Geometry {
    let now: Vec<&[f32]> = centroids.chunks_exact(d).collect();
    let before: Vec<&[f32]> = previous.chunks_exact(d).collect();
    let drift: Vec<f32> = now
        .iter()
        .zip(&before)
        .map(|(a, b)| up(dist(a, b) * (1.0 + F64_SLACK)))
        .collect();
    let mut max_drift = (0.0, usize::MAX, 0.0);
    for (j, &v) in drift.iter().enumerate() {
        if v > max_drift.0 {
            max_drift = (v, j, max_drift.0);
        } else if v > max_drift.2 {
            max_drift.2 = v;
        }
    }
    let half_gap: Vec<f32> = (0..k)
        .into_par_iter()
        .map(|j| {
            let nearest = (0..k)
                .filter(|&o| o != j)
                .map(|o| dist(now[j], now[o]))
                .fold(f64::INFINITY, f64::min);
            down(0.5 * nearest * (1.0 - F64_SLACK))
        })
        .collect();
    // The kernel's shift is the f32 rounding of the f64 mean: R around the f64
    // mean, plus how far the rounding can move it.
    let mut mean = vec![0.0f64; d];
    for c in &now {
        for (m, &v) in mean.iter_mut().zip(*c) {
            *m += f64::from(v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= k as f64);
    let mean_norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt();
    let radius = now
        .iter()
        .map(|c| {
            c.iter()
                .zip(&mean)
                .map(|(&v, &m)| (f64::from(v) - m).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .fold(0.0, f64::max);
    let radius = (radius + mean_norm * f64::from(f32::EPSILON)) * (1.0 + F64_SLACK);
    Geometry {
        drift,
        max_drift,
        half_gap,
        two_radius: up(2.0 * radius),
        gamma: up(2.0 * (d as f64 + 8.0) * f64::from(f32::EPSILON) / 2.0),
    }
}

impl Geometry {
    /// `2δ` for a point at most `u` from its centroid (see the module docs).
    #[inline(always)]
    fn two_delta(&self, u: f32) -> f32 {
        let t = u + self.two_radius;
        2.0 * self.gamma * t * t * UP
    }

    /// Label and bounds of a point whose best and second best the kernel just
    /// computed.
    #[inline(always)]
    fn fresh(&self, near: &Nearest) -> (u32, f32, f32) {
        // The direct distances carry a relative error below γ / 2.
        let u = (near.best_dist * (1.0 + self.gamma)).sqrt() * UP;
        // Every centroid other than the best and second had a kernel value at
        // least the second's: its true squared distance is at least second − 2δ.
        let l2 = (near.second_dist * (1.0 - self.gamma) * DOWN - self.two_delta(u)) * DOWN;
        (near.best, u, l2.max(0.0).sqrt() * DOWN)
    }
}

/// New bounds for every point from a full pass.
fn refresh_all(state: &mut Bounds, near: &[Nearest], geo: &Geometry) {
    state
        .labels
        .par_iter_mut()
        .zip(state.upper.par_iter_mut())
        .zip(state.lower.par_iter_mut())
        .zip(near.par_iter())
        .for_each(|(((a, u), l), s)| (*a, *u, *l) = geo.fresh(s));
}

/// See [`Backend::assign_labels`](crate::Backend::assign_labels).
pub(crate) fn assign_labels(
    points: &Resident,
    bounds: &mut Resident,
    centroids: &[f32],
    k: usize,
    labels: &mut [u32],
) -> Result<LabelStats, KernelError> {
    let host = storage::<HostPoints>(points, NAME, "the points of assign_labels", "dense")?;
    let d = host.d;
    let n = host.values.len() / d;
    let state = storage_mut::<Bounds>(bounds, NAME, "the bounds of assign_labels", "bounds")?;
    if state.n != n {
        return Err(KernelError::Shape(format!(
            "the bounds were made for {} points but {n} are uploaded",
            state.n
        )));
    }
    check::centroids(centroids, k, d)?;
    check::results(labels.len(), n)?;

    if state.previous.len() != centroids.len() {
        // First round, or another k: every point through the kernel.
        let geo = geometry(centroids, centroids, d, k);
        let mut near = vec![Nearest::default(); n];
        assign_rows(&host.values, d, centroids, k, &mut near);
        state.labels.resize(n, 0);
        state.upper.resize(n, 0.0);
        state.lower.resize(n, 0.0);
        refresh_all(state, &near, &geo);
        state.previous = centroids.to_vec();
        labels.copy_from_slice(&state.labels);
        return Ok(LabelStats { recomputed: n });
    }

    let geo = geometry(centroids, &state.previous, d, k);
    // Pass 1: move the bounds, and list the points they cannot certify.
    let pending: Vec<Vec<u32>> = state
        .labels
        .par_chunks(CHUNK)
        .zip(state.upper.par_chunks_mut(CHUNK))
        .zip(state.lower.par_chunks_mut(CHUNK))
        .enumerate()
        .map(|(c, ((a, u), l))| {
            let mut todo = Vec::new();
            for (i, ((&a, u), l)) in a.iter().zip(u).zip(l).enumerate() {
                let a = a as usize;
                let others = if a == geo.max_drift.1 {
                    geo.max_drift.2
                } else {
                    geo.max_drift.0
                };
                let upper = (*u + geo.drift[a]) * UP;
                let moved = ((*l - others) * DOWN).max(0.0);
                let lower = moved.max((2.0 * geo.half_gap[a] - upper) * DOWN);
                *u = upper;
                *l = lower;
                if upper * upper * UP + geo.two_delta(upper) >= lower * lower * DOWN {
                    todo.push((c * CHUNK + i) as u32);
                }
            }
            todo
        })
        .collect();

    // Pass 2: the uncertified points through the kernel. When most points are
    // uncertified, all of them in place (gathering them would cost more than the
    // distances of the others saved).
    let m: usize = pending.iter().map(Vec::len).sum();
    if m > n / 2 {
        let mut near = vec![Nearest::default(); n];
        assign_rows(&host.values, d, centroids, k, &mut near);
        refresh_all(state, &near, &geo);
    } else if m > 0 {
        let rows: Vec<u32> = pending.concat();
        let mut gathered = vec![0.0f32; m * d];
        gathered
            .par_chunks_mut(d * 1024)
            .zip(rows.par_chunks(1024))
            .for_each(|(dst, rows)| {
                for (dst, &r) in dst.chunks_exact_mut(d).zip(rows) {
                    let r = r as usize;
                    dst.copy_from_slice(&host.values[r * d..(r + 1) * d]);
                }
            });
        let mut near = vec![Nearest::default(); m];
        assign_rows(&gathered, d, centroids, k, &mut near);
        // Back to the points, chunk by chunk as listed in pass 1.
        let mut results = Vec::with_capacity(pending.len());
        let mut rest = near.as_slice();
        for p in &pending {
            let (mine, after) = rest.split_at(p.len());
            results.push(mine);
            rest = after;
        }
        state
            .labels
            .par_chunks_mut(CHUNK)
            .zip(state.upper.par_chunks_mut(CHUNK))
            .zip(state.lower.par_chunks_mut(CHUNK))
            .zip(pending.par_iter().zip(results.par_iter()))
            .enumerate()
            .for_each(|(c, (((a, u), l), (rows, near)))| {
                for (&r, s) in rows.iter().zip(near.iter()) {
                    let i = r as usize - c * CHUNK;
                    (a[i], u[i], l[i]) = geo.fresh(s);
                }
            });
    }
    state.previous.copy_from_slice(centroids);
    labels.copy_from_slice(&state.labels);
    Ok(LabelStats { recomputed: m })
}

#[cfg(test)]
mod tests {
    use crate::cpu::tests::Rng;
    use crate::{Backend, CpuBackend, KernelError, Nearest};

    /// Runs `rounds` of `assign_labels` along a centroid trajectory and checks
    /// every round's labels against a full `assign`; returns the points recomputed.
    fn follow(points: &[f32], d: usize, trajectory: &[Vec<f32>]) -> Vec<usize> {
        let cpu = CpuBackend::new();
        let resident = cpu.upload(points, d).unwrap();
        let mut bounds = cpu.lloyd_bounds(&resident).unwrap();
        let n = points.len() / d;
        let mut labels = vec![u32::MAX; n];
        let mut near = vec![Nearest::default(); n];
        let mut recomputed = Vec::new();
        for (round, c) in trajectory.iter().enumerate() {
            let k = c.len() / d;
            let stats = cpu
                .assign_labels(&resident, &mut bounds, c, k, &mut labels)
                .unwrap();
            cpu.assign(&resident, c, k, &mut near).unwrap();
            for (i, (l, s)) in labels.iter().zip(&near).enumerate() {
                assert_eq!(*l, s.best, "round {round}, point {i}");
            }
            recomputed.push(stats.recomputed);
        }
        recomputed
    }

    #[test]
    fn labels_equal_full_passes_along_a_converging_trajectory() {
        for d in [1, 3, 17, 64] {
            let (n, k) = (5000, 12);
            let mut rng = Rng(d as u64);
            let points: Vec<f32> = (0..n * d).map(|_| rng.unit() * 10.0).collect();
            let mut c: Vec<f32> = points[..k * d].to_vec();
            let mut trajectory = vec![c.clone()];
            // Moves that shrink round after round, as Lloyd's do.
            for round in 1..12 {
                let step = 2.0 / (round * round) as f32;
                for v in c.iter_mut() {
                    *v += rng.unit() * 0.5 * step;
                }
                trajectory.push(c.clone());
            }
            let recomputed = follow(&points, d, &trajectory);
            assert_eq!(recomputed[0], n);
            assert!(*recomputed.last().unwrap() < n, "d = {d}: {recomputed:?}");
        }
    }

    #[test]
    fn ties_go_to_the_lowest_index_as_in_full_passes() {
        // Integer grid points and centroids: many points equidistant to several
        // centroids, and two identical centroids.
        let d = 2;
        let points: Vec<f32> = (0..21 * 21)
            .flat_map(|i| [(i % 21) as f32 - 10.0, (i / 21) as f32 - 10.0])
            .collect();
        let base = vec![-4.0f32, 0.0, 4.0, 0.0, 0.0, 4.0, 0.0, 4.0, 0.0, -4.0];
        let mut trajectory = vec![base.clone(), base.clone()];
        // Tiny moves that keep near-ties near, then moves back onto the grid.
        let mut nudged = base.clone();
        nudged[0] += 1e-6;
        trajectory.push(nudged);
        trajectory.push(base.clone());
        trajectory.push(base);
        follow(&points, d, &trajectory);
    }

    #[test]
    fn jumps_and_a_new_k_start_over_safely() {
        let d = 24;
        let mut rng = Rng(7);
        let points: Vec<f32> = (0..3000 * d).map(|_| rng.unit()).collect();
        let a: Vec<f32> = (0..8 * d).map(|_| rng.unit()).collect();
        let b: Vec<f32> = (0..8 * d).map(|_| rng.unit() * 3.0 - 1.0).collect();
        let c: Vec<f32> = (0..5 * d).map(|_| rng.unit()).collect();
        let far: Vec<f32> = a.iter().map(|v| v + 1e4).collect();
        let recomputed = follow(
            &points,
            d,
            &[a.clone(), b, a.clone(), c.clone(), c, far, a.clone(), a],
        );
        assert_eq!(recomputed[3], 3000, "another k starts over");
        // Unmoved centroids: only near-ties (within the rounding margin) again.
        assert!(recomputed[7] < 30, "{recomputed:?}");
    }

    #[test]
    fn far_from_zero_features_stay_exact() {
        // Prices and years: large values where the expanded form loses digits.
        let d = 20;
        let mut rng = Rng(3);
        let points: Vec<f32> = (0..4000 * d).map(|_| 2024.0 + rng.unit()).collect();
        let mut c: Vec<f32> = points[..6 * d].to_vec();
        let mut trajectory = vec![c.clone()];
        for _ in 0..6 {
            for v in c.iter_mut() {
                *v += rng.unit() * 0.5e-3;
            }
            trajectory.push(c.clone());
        }
        follow(&points, d, &trajectory);
    }

    #[test]
    fn bad_calls_are_refused() {
        let cpu = CpuBackend::new();
        let points = cpu.upload(&[0.0, 1.0, 2.0, 3.0], 2).unwrap();
        let other = cpu.upload(&[0.0, 1.0], 2).unwrap();
        let mut bounds = cpu.lloyd_bounds(&other).unwrap();
        let mut labels = vec![0; 2];
        let err = cpu
            .assign_labels(&points, &mut bounds, &[0.0, 0.0], 1, &mut labels)
            .unwrap_err();
        assert!(err.to_string().contains("made for 1 points"), "{err}");
        let mut bounds = cpu.lloyd_bounds(&points).unwrap();
        let err = cpu
            .assign_labels(&points, &mut bounds, &[f32::NAN, 0.0], 1, &mut labels)
            .unwrap_err();
        assert!(matches!(err, KernelError::NonFiniteCentroid { .. }));
        let err = cpu
            .assign_labels(&points, &mut bounds, &[0.0, 0.0], 1, &mut labels[..1])
            .unwrap_err();
        assert!(matches!(err, KernelError::Shape(_)));
        // Points are not bounds.
        let mut not_bounds = cpu.upload(&[0.0, 1.0, 2.0, 3.0], 2).unwrap();
        let err = cpu
            .assign_labels(&points, &mut not_bounds, &[0.0, 0.0], 1, &mut labels)
            .unwrap_err();
        assert!(err.to_string().contains("bounds"), "{err}");
    }
}
