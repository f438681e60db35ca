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
//! included. The other points go through the full kernel, which also refreshes
//! their bounds from its best and second best.
//!
//! Where the kernel hands out its own values (the AVX-512 kernel), the refresh
//! needs no direct distances for most points: with `K_b ≤ K_s` the kernel's best
//! and second best values of a point `x`, each within `δ_x / 2` of the true
//! squared distance, as are the direct ones, `K_s − K_b > 2δ_x` proves that the
//! direct distances (hence a full pass) order the two the same way, so the label
//! is the kernel's best, with `u² = K_b + δ_x` and `l² = K_s − δ_x` (every other
//! centroid's kernel value is at least `K_s`). Here `δ_x = γ (‖x − s‖ + R)²`,
//! `‖x − s‖` bounded from the kernel's squared norm of `x'`. Only the points
//! closer to a tie than that get their direct distances, exactly as the full
//! pass does.
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

use super::assign::{self as cpu, Raw, assign_rows};
use super::host::{HostPoints, NAME, storage, storage_mut};
use crate::{Backend, KernelError, LabelStats, Nearest, PartialSums, Resident, check};

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
    /// The last round's results of the kernel (on CPUs whose kernel does not
    /// hand out its own values), kept for the next.
    near: Vec<Nearest>,
}

impl Bounds {
    pub(crate) fn new(n: usize) -> Bounds {
        Bounds {
            n,
            labels: Vec::new(),
            upper: Vec::new(),
            lower: Vec::new(),
            previous: Vec::new(),
            near: Vec::new(),
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

impl Geometry {
    /// `δ_x` of a point whose shifted squared norm the kernel computed as
    /// `norm` (see the module docs): `γ (‖x − s‖ + R)²`, rounded up, with
    /// `‖x − s‖ ≤ √(norm (1 + γ))` widened by the rounding of the shift.
    #[inline(always)]
    fn kernel_delta(&self, norm: f32) -> f32 {
        let t = (norm * (1.0 + self.gamma)).sqrt() * UP * UP + 0.5 * self.two_radius;
        self.gamma * t * t * UP
    }

    /// Label and bounds of a point (row `x`) from the kernel's own values: as
    /// [`Geometry::fresh`] of the full pass's result, which is computed only
    /// when the kernel's values are too close to a tie to decide.
    #[inline(always)]
    fn fresh_kernel(&self, raw: &Raw, x: &[f32], centroids: &[f32], k: usize) -> (u32, f32, f32) {
        let near = &raw.near;
        if raw.norm == f32::INFINITY {
            // Already the final result, by direct distances.
            return self.fresh(near);
        }
        let delta = self.kernel_delta(raw.norm);
        // `ks − kb` is computed in f32: rounded down, it must still beat 2δ.
        if near.best != crate::NO_SECOND
            && (near.second_dist - near.best_dist) * DOWN > 2.0 * delta * UP
        {
            let u = ((near.best_dist + delta) * UP).sqrt() * UP;
            let l = ((near.second_dist - delta) * DOWN).max(0.0).sqrt() * DOWN;
            return (near.best, u, l);
        }
        self.fresh(&cpu::refine_finish(*near, x, centroids, k))
    }
}

/// Label and bounds, exactly as a full pass would give them, of the points
/// `rows` (all when `None`), in that order, into `out`.
fn fresh_points(
    host: &HostPoints,
    rows: Option<&[u32]>,
    centroids: &[f32],
    k: usize,
    geo: &Geometry,
    state: &mut Bounds,
    out: &mut [(u32, f32, f32)],
) {
    let d = host.d;
    let m = out.len();
    let row = |i: usize| {
        let r = rows.map_or(i, |rows| rows[i] as usize);
        &host.values[r * d..(r + 1) * d]
    };
    #[cfg(target_arch = "x86_64")]
    if cpu::kernel_values_available(d) {
        let pass = cpu::KernelPass::new(centroids, d, k);
        let source = match rows {
            None => cpu::Rows::Block(&host.values),
            Some(rows) => cpu::Rows::Picked {
                points: &host.values,
                rows,
            },
        };
        out.par_chunks_mut(cpu::KERNEL_TILE)
            .enumerate()
            .for_each_init(
                || (cpu::KernelScratch::new(d), vec![RAW; cpu::KERNEL_TILE]),
                |(scratch, raw), (t, out)| {
                    let first = t * cpu::KERNEL_TILE;
                    let raw = &mut raw[..out.len()];
                    pass.values(source, first..first + out.len(), scratch, raw);
                    for (i, (o, raw)) in out.iter_mut().zip(raw.iter()).enumerate() {
                        *o = geo.fresh_kernel(raw, row(first + i), centroids, k);
                    }
                },
            );
        return;
    }
    state.near.resize(m, Nearest::default());
    match rows {
        None => assign_rows(&host.values, d, centroids, k, &mut state.near),
        Some(rows) => {
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
            assign_rows(&gathered, d, centroids, k, &mut state.near);
        }
    }
    out.par_iter_mut()
        .zip(state.near.par_iter())
        .for_each(|(o, s)| *o = geo.fresh(s));
}

/// A placeholder kernel value.
#[cfg(target_arch = "x86_64")]
const RAW: Raw = Raw {
    near: Nearest {
        best: crate::NO_SECOND,
        best_dist: f32::INFINITY,
        second: crate::NO_SECOND,
        second_dist: f32::INFINITY,
    },
    norm: 0.0,
};

/// New labels and bounds for every point from a full pass; with `sums`, also
/// the partial sums of the new labels when they can be had in the same pass
/// over the points (they are those of `Backend::partial_sums`, bit for bit).
fn refresh_all(
    host: &HostPoints,
    centroids: &[f32],
    k: usize,
    geo: &Geometry,
    state: &mut Bounds,
    sums: bool,
) -> Option<PartialSums> {
    #[cfg(target_arch = "x86_64")]
    if sums && cpu::kernel_values_available(host.d) {
        return Some(refresh_all_with_sums(host, centroids, k, geo, state));
    }
    let _ = sums;
    let mut fresh = vec![(0u32, 0.0f32, 0.0f32); state.n];
    fresh_points(host, None, centroids, k, geo, state, &mut fresh);
    state
        .labels
        .par_iter_mut()
        .zip(state.upper.par_iter_mut())
        .zip(state.lower.par_iter_mut())
        .zip(fresh.par_iter())
        .for_each(|(((a, u), l), f)| (*a, *u, *l) = *f);
    None
}

/// [`refresh_all`] and the partial sums in one pass: each chunk of the sums
/// (see `cpu::merge_chunk_sums`) labels its points tile by tile and adds each
/// tile to its sums while the tile's rows are still in the cache.
#[cfg(target_arch = "x86_64")]
fn refresh_all_with_sums(
    host: &HostPoints,
    centroids: &[f32],
    k: usize,
    geo: &Geometry,
    state: &mut Bounds,
) -> PartialSums {
    let d = host.d;
    let pass = cpu::KernelPass::new(centroids, d, k);
    let source = cpu::Rows::Block(&host.values);
    let rows = cpu::SUM_CHUNK_ROWS;
    let mut chunks: Vec<_> = state
        .labels
        .chunks_mut(rows)
        .zip(state.upper.chunks_mut(rows))
        .zip(state.lower.chunks_mut(rows))
        .collect();
    cpu::merge_chunk_sums(k, d, &mut chunks, |c, ((a, u), l)| {
        let mut scratch = cpu::KernelScratch::new(d);
        let mut raw = vec![RAW; cpu::KERNEL_TILE];
        let mut sums = cpu::ChunkSums::new(k, d);
        let start = c * rows;
        for t0 in (0..a.len()).step_by(cpu::KERNEL_TILE) {
            let m = (a.len() - t0).min(cpu::KERNEL_TILE);
            let first = start + t0;
            let tile = &host.values[first * d..(first + m) * d];
            pass.values(source, first..first + m, &mut scratch, &mut raw[..m]);
            for (i, (raw, x)) in raw[..m].iter().zip(tile.chunks_exact(d)).enumerate() {
                let j = t0 + i;
                (a[j], u[j], l[j]) = geo.fresh_kernel(raw, x, centroids, k);
            }
            sums.add(tile, &a[t0..t0 + m]);
        }
        sums.finish()
    })
}

/// See [`Backend::assign_labels`](crate::Backend::assign_labels).
pub(crate) fn assign_labels(
    points: &Resident,
    bounds: &mut Resident,
    centroids: &[f32],
    k: usize,
    labels: &mut [u32],
) -> Result<LabelStats, KernelError> {
    Ok(label_round(points, bounds, centroids, k, labels, false)?.0)
}

/// See [`Backend::lloyd_round`](crate::Backend::lloyd_round): the partial sums
/// come out of the labelling pass when it is a full one (on CPUs whose kernel
/// hands out its values), else from a pass of their own.
pub(crate) fn lloyd_round(
    points: &Resident,
    bounds: &mut Resident,
    centroids: &[f32],
    k: usize,
    labels: &mut [u32],
) -> Result<(LabelStats, PartialSums), KernelError> {
    let (stats, sums) = label_round(points, bounds, centroids, k, labels, true)?;
    let sums = match sums {
        Some(sums) => sums,
        None => crate::CpuBackend::new().partial_sums(points, labels, k)?,
    };
    Ok((stats, sums))
}

/// See [`Backend::far_points`](crate::Backend::far_points): after a round with
/// these centroids, every point's upper bound `u` on its distance gives
/// `u² (1 + γ)` as a bound on the distance `assign` computes for it, so only the
/// points whose bound reaches the `m`-th largest computed distance need theirs.
pub(crate) fn far_points(
    points: &Resident,
    bounds: &Resident,
    centroids: &[f32],
    k: usize,
    m: usize,
) -> Result<Vec<(u32, f32)>, KernelError> {
    let host = storage::<HostPoints>(points, NAME, "the points of far_points", "dense")?;
    let state = storage::<Bounds>(bounds, NAME, "the bounds of far_points", "bounds")?;
    let d = host.d;
    let n = host.values.len() / d;
    check::centroids(centroids, k, d)?;
    if m == 0 || n == 0 {
        return Ok(Vec::new());
    }
    let distances = |rows: &[u32]| -> Vec<(usize, f32)> {
        let mut gathered = vec![0.0f32; rows.len() * d];
        for (dst, &r) in gathered.chunks_exact_mut(d).zip(rows) {
            let r = r as usize;
            dst.copy_from_slice(&host.values[r * d..(r + 1) * d]);
        }
        let mut near = vec![Nearest::default(); rows.len()];
        assign_rows(&gathered, d, centroids, k, &mut near);
        rows.iter()
            .zip(&near)
            .map(|(&r, s)| (r as usize, s.best_dist))
            .collect()
    };
    let valid = state.n == n
        && state.upper.len() == n
        && state.previous.len() == centroids.len()
        && state
            .previous
            .iter()
            .zip(centroids)
            .all(|(a, b)| a.to_bits() == b.to_bits());
    if !valid {
        // Bounds of other centroids: every distance.
        let all: Vec<u32> = (0..n as u32).collect();
        return Ok(crate::farthest(distances(&all).into_iter(), m));
    }
    let gamma = geometry(centroids, centroids, d, k).gamma;
    let bound = |u: f32| u * u * (1.0 + gamma) * UP * UP;
    // The points of the largest bounds first...
    let mut keyed: Vec<(f32, u32)> = state
        .upper
        .par_iter()
        .enumerate()
        .map(|(r, &u)| (bound(u), r as u32))
        .collect();
    let first = (4 * m).min(n);
    let by_bound = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if first < n {
        keyed.select_nth_unstable_by(first - 1, by_bound);
    }
    let rows: Vec<u32> = keyed[..first].iter().map(|p| p.1).collect();
    let mut computed = distances(&rows);
    let top = crate::farthest(computed.iter().copied(), m);
    if first < n && top.len() == m {
        // ...then every other point whose bound reaches the m-th distance (a
        // tie may still win on its row).
        let t = top[m - 1].1;
        let more: Vec<u32> = keyed[first..]
            .iter()
            .filter(|p| p.0 >= t)
            .map(|p| p.1)
            .collect();
        computed.extend(distances(&more));
    }
    Ok(crate::farthest(computed.into_iter(), m))
}

/// One round of labels; with `want_sums`, also the partial sums when the round
/// makes a full pass that can give them.
fn label_round(
    points: &Resident,
    bounds: &mut Resident,
    centroids: &[f32],
    k: usize,
    labels: &mut [u32],
    want_sums: bool,
) -> Result<(LabelStats, Option<PartialSums>), KernelError> {
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
        state.labels.resize(n, 0);
        state.upper.resize(n, 0.0);
        state.lower.resize(n, 0.0);
        let sums = refresh_all(host, centroids, k, &geo, state, want_sums);
        state.previous = centroids.to_vec();
        labels.copy_from_slice(&state.labels);
        return Ok((LabelStats { recomputed: n }, sums));
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
    // uncertified, all of them in place (picking them out of the others would
    // cost more than the distances of the others saved).
    let m: usize = pending.iter().map(Vec::len).sum();
    let mut sums = None;
    if m > n / 2 {
        sums = refresh_all(host, centroids, k, &geo, state, want_sums);
    } else if m > 0 {
        let rows: Vec<u32> = pending.concat();
        let mut fresh = vec![(0u32, 0.0f32, 0.0f32); m];
        fresh_points(host, Some(&rows), centroids, k, &geo, state, &mut fresh);
        // Back to the points, chunk by chunk as listed in pass 1.
        let mut results = Vec::with_capacity(pending.len());
        let mut rest = fresh.as_slice();
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
            .for_each(|(c, (((a, u), l), (rows, fresh)))| {
                for (&r, f) in rows.iter().zip(fresh.iter()) {
                    let i = r as usize - c * CHUNK;
                    (a[i], u[i], l[i]) = *f;
                }
            });
    }
    state.previous.copy_from_slice(centroids);
    labels.copy_from_slice(&state.labels);
    Ok((LabelStats { recomputed: m }, sums))
}

#[cfg(test)]
mod tests {
    use crate::cpu::assign::tests::Rng;
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
    fn ties_above_the_direct_path_go_to_the_lowest_index() {
        // As above with 24 features (the expanded-form kernels): points of a
        // small integer grid, centroids on it too (one twice), so that many
        // points are exactly equidistant to several centroids.
        let d = 24;
        let mut rng = Rng(12);
        let grid = |rng: &mut Rng| (rng.unit() * 2.5).round();
        let points: Vec<f32> = (0..3000 * d).map(|_| grid(&mut rng)).collect();
        let mut base: Vec<f32> = (0..6 * d).map(|_| grid(&mut rng)).collect();
        base.extend_from_within(2 * d..3 * d);
        let mut nudged = base.clone();
        nudged[5] += 1e-6;
        follow(
            &points,
            d,
            &[base.clone(), base.clone(), nudged, base.clone(), base],
        );
    }

    #[test]
    fn lloyd_rounds_give_the_labels_and_sums_of_separate_calls() {
        // Several chunks of the sums, magnitudes that make the f64 sums round,
        // rounds with full passes (the first, a jump) and with certified points.
        let (n, d, k) = (3 * crate::cpu::SUM_CHUNK_ROWS + 555, 40, 9);
        let mut rng = Rng(31);
        let points: Vec<f32> = (0..n * d)
            .map(|_| rng.unit() * 2f32.powi((rng.unit() * 20.0) as i32))
            .collect();
        let mut c: Vec<f32> = points[..k * d].to_vec();
        let cpu = CpuBackend::new();
        let resident = cpu.upload(&points, d).unwrap();
        let mut fused = cpu.lloyd_bounds(&resident).unwrap();
        let mut separate = cpu.lloyd_bounds(&resident).unwrap();
        let (mut l1, mut l2) = (vec![0; n], vec![0; n]);
        let bits = |p: &crate::PartialSums| p.sums.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for round in 0..8 {
            if round == 4 {
                c.iter_mut().for_each(|v| *v += 50.0);
            } else {
                c.iter_mut().for_each(|v| *v += rng.unit() * 0.01);
            }
            let (s1, sums1) = cpu
                .lloyd_round(&resident, &mut fused, &c, k, &mut l1)
                .unwrap();
            let s2 = cpu
                .assign_labels(&resident, &mut separate, &c, k, &mut l2)
                .unwrap();
            let sums2 = cpu.partial_sums(&resident, &l2, k).unwrap();
            assert_eq!(s1, s2, "round {round}");
            assert_eq!(l1, l2, "round {round}");
            assert_eq!(bits(&sums1), bits(&sums2), "round {round}");
            assert_eq!(sums1.counts, sums2.counts, "round {round}");
        }
    }

    #[test]
    fn far_points_from_the_bounds_are_those_of_a_full_pass() {
        // Blobs, a converging trajectory with a jump, copies of the farthest
        // point (ties), and bounds of other centroids (a full pass then).
        let (n, d, k, m) = (20_000, 12, 7, 7);
        let mut rng = Rng(41);
        let mut points: Vec<f32> = (0..n * d).map(|i| rng.unit() + (i % 5) as f32).collect();
        let far: Vec<f32> = (0..d).map(|_| 40.0).collect();
        for &r in &[19_000, 3, 77, 15_000] {
            points[r * d..(r + 1) * d].copy_from_slice(&far);
        }
        let cpu = CpuBackend::new();
        let resident = cpu.upload(&points, d).unwrap();
        let mut bounds = cpu.lloyd_bounds(&resident).unwrap();
        let mut labels = vec![0; n];
        let mut near = vec![Nearest::default(); n];
        let mut c: Vec<f32> = points[100 * d..(100 + k) * d].to_vec();
        for round in 0..6 {
            if round == 3 {
                c.iter_mut().for_each(|v| *v += 5.0);
            } else {
                c.iter_mut().for_each(|v| *v += rng.unit() * 0.05);
            }
            cpu.lloyd_round(&resident, &mut bounds, &c, k, &mut labels)
                .unwrap();
            cpu.assign(&resident, &c, k, &mut near).unwrap();
            let want = crate::farthest(near.iter().map(|s| s.best_dist).enumerate(), m);
            let got = cpu.far_points(&resident, &bounds, &c, k, m).unwrap();
            assert_eq!(got, want, "round {round}");
            assert_eq!(
                &got.iter().map(|p| p.0).take(4).collect::<Vec<_>>(),
                &[3, 77, 15_000, 19_000]
            );
            // other centroids than the bounds': still exact
            let other: Vec<f32> = c.iter().map(|v| v * 0.5).collect();
            cpu.assign(&resident, &other, k, &mut near).unwrap();
            let want = crate::farthest(near.iter().map(|s| s.best_dist).enumerate(), m);
            assert_eq!(
                cpu.far_points(&resident, &bounds, &other, k, m).unwrap(),
                want
            );
        }
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
