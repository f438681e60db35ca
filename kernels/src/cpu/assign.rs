//! Distances of points to centroids (nearest and second nearest) and the
//! partial sums of a labelling, on host memory.
//!
//! `assign` works on fixed tiles of points. Up to [`DIRECT_MAX_D`] features it
//! computes every distance directly (one loop specialised per `d`). Above, it uses
//! `‖x‖² − 2x·c + ‖c‖²`: on x86-64 CPUs with AVX2 and FMA (detected at run time)
//! a fused kernel (module `fused`) accumulates the dot products of 6 points with
//! 16 centroids in registers and keeps each point's best and second best there,
//! never storing the distances; elsewhere a tile of [`TILE_ROWS`] points goes
//! against a block of [`CENTROID_BLOCK`] centroids as one `matrixmultiply` sgemm,
//! then a scan keeps the running best and second best. Before the products, points
//! and centroids are shifted by the mean of the centroids, so the norms stay of the
//! order of the distances and the cancellation error stays small even for features
//! far from 0 (a year, a price). The distances reported for the best and second
//! best are then recomputed directly from the original values.
//!
//! Every step works on one point at a time (each dot product is the same sequence
//! of operations whatever the other rows of its tile), so a point's result never
//! depends on the tile it landed in or on the threads. (Two CPUs of different
//! kinds may differ in the last bit of the expanded form, hence in the choice
//! between two nearly equidistant centroids: `matrixmultiply` itself picks its
//! kernel by CPU.)
//!
//! `partial_sums` accumulates fixed chunks of [`SUM_CHUNK_ROWS`] points in parallel
//! and merges the chunk partials sequentially, from the last chunk to the first.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::lanes;
use crate::{NO_SECOND, Nearest, PartialSums};

/// Points per parallel work item of `assign`.
const TILE_ROWS: usize = 256;
/// Up to this many features distances are computed directly; above, with a GEMM.
const DIRECT_MAX_D: usize = 16;
/// Centroids per GEMM call: keeps the `TILE_ROWS x CENTROID_BLOCK` dot products
/// (128 KiB) in cache while the tile's best and second best are updated.
const CENTROID_BLOCK: usize = 128;
/// Points per partial of `partial_sums`. A constant, so that the order in which
/// the sums are added does not depend on the number of threads.
pub(crate) const SUM_CHUNK_ROWS: usize = 4096;
/// Upper bound on the memory held by chunk partials waiting to be merged.
const PARTIALS_BUDGET_BYTES: usize = 256 << 20;
/// Independent accumulators of [`lane_sq_dist`] (one AVX register of f32).
const LANES: usize = 8;

/// The partial sums of a set of points cut into chunks of [`SUM_CHUNK_ROWS`]:
/// `chunk(c, &mut items[c])` gives chunk `c`'s (one item per chunk, for what the
/// chunk's work needs of its own). Chunks run in parallel batches, and their
/// partials are merged from the last chunk to the first whatever the batches
/// (right after a pass that streamed the points from the first to the last, the
/// last ones are still in the cache), so the sums do not depend on the threads.
pub(crate) fn merge_chunk_sums<T: Send>(
    k: usize,
    d: usize,
    items: &mut [T],
    chunk: impl Fn(usize, &mut T) -> PartialSums + Sync,
) -> PartialSums {
    let partial_bytes = (k * d + k) * 8;
    // How many chunk partials are computed before being merged: only bounds the
    // memory, the merge order is the (reversed) chunk order whatever this is.
    let batch = (rayon::current_num_threads() * 4)
        .min(PARTIALS_BUDGET_BYTES / partial_bytes.max(1))
        .max(1);
    let mut total = PartialSums::zeros(k, d);
    let mut last = items.len();
    while last > 0 {
        let first = last.saturating_sub(batch);
        let partials: Vec<PartialSums> = items[first..last]
            .par_iter_mut()
            .enumerate()
            .rev()
            .map(|(i, item)| chunk(first + i, item))
            .collect();
        for p in &partials {
            total.merge(p);
        }
        last = first;
    }
    total
}

/// Sums and counts of one chunk, sequentially.
pub(crate) fn chunk_sums(points: &[f32], d: usize, labels: &[u32], k: usize) -> PartialSums {
    let mut sums = ChunkSums::new(k, d);
    sums.add(points, labels);
    sums.finish()
}

/// The partial sums of one chunk, built up from its points in order (in pieces
/// or at once: the same additions in the same order). While they grow, each
/// centroid's sums start a cache line of their own (rows padded to whole lines),
/// so that no vector of them is split between two lines.
pub(crate) struct ChunkSums {
    k: usize,
    d: usize,
    /// `d` rounded up to whole lines of 8 f64.
    stride: usize,
    lines: Vec<Line>,
    counts: Vec<u64>,
}

/// One cache line of f64 sums.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f64; 8]);

impl ChunkSums {
    pub(crate) fn new(k: usize, d: usize) -> ChunkSums {
        let stride = d.next_multiple_of(8);
        ChunkSums {
            k,
            d,
            stride,
            lines: vec![Line([0.0; 8]); k * stride / 8],
            counts: vec![0; k],
        }
    }

    /// Adds `points` (labels `labels`, each `< k`), one after the other.
    pub(crate) fn add(&mut self, points: &[f32], labels: &[u32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU runs AVX-512F (checked just above).
                return unsafe { add_sums_avx512(self, points, labels) };
            }
            if is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU runs AVX2 (checked just above).
                return unsafe { add_sums_avx2(self, points, labels) };
            }
        }
        add_sums_body(self, points, labels)
    }

    pub(crate) fn finish(self) -> PartialSums {
        let (d, stride) = (self.d, self.stride);
        let mut sums = Vec::with_capacity(self.k * d);
        for j in 0..self.k {
            let line = j * stride / 8;
            let row = self.lines[line..line + stride / 8].iter().flat_map(|l| l.0);
            sums.extend(row.take(d));
        }
        PartialSums {
            k: self.k,
            d,
            sums,
            counts: self.counts,
        }
    }
}

/// [`add_sums_body`] compiled for AVX2: the same additions in the same order,
/// four f64 at a time instead of two.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn add_sums_avx2(p: &mut ChunkSums, points: &[f32], labels: &[u32]) {
    add_sums_body(p, points, labels)
}

/// [`add_sums_body`] compiled for AVX-512: the same additions in the same order,
/// eight f64 at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn add_sums_avx512(p: &mut ChunkSums, points: &[f32], labels: &[u32]) {
    add_sums_body(p, points, labels)
}

#[inline(always)]
fn add_sums_body(p: &mut ChunkSums, points: &[f32], labels: &[u32]) {
    let (d, stride) = (p.d, p.stride);
    let counts = &mut p.counts;
    // SAFETY: `Line` is 8 f64 and nothing else (`repr(C)`, size 64), so the lines
    // are `k * stride` consecutive, initialised f64, borrowed exclusively here.
    let sums =
        unsafe { std::slice::from_raw_parts_mut(p.lines.as_mut_ptr().cast::<f64>(), p.k * stride) };
    for (x, &label) in points.chunks_exact(d).zip(labels) {
        let label = label as usize;
        counts[label] += 1;
        for (s, &v) in sums[label * stride..label * stride + d].iter_mut().zip(x) {
            *s += f64::from(v);
        }
    }
}

/// Nothing seen yet (both indices `NO_SECOND`).
pub(crate) const EMPTY: Nearest = Nearest {
    best: NO_SECOND,
    best_dist: f32::INFINITY,
    second: NO_SECOND,
    second_dist: f32::INFINITY,
};

/// Offers centroid `j` at `dist` to the running best and second best. Centroids
/// must be offered in index order: with strict comparisons, ties keep the lower
/// index.
#[inline(always)]
fn offer(s: &mut Nearest, j: u32, dist: f32) {
    if dist < s.best_dist {
        s.second = s.best;
        s.second_dist = s.best_dist;
        s.best = j;
        s.best_dist = dist;
    } else if dist < s.second_dist {
        s.second = j;
        s.second_dist = dist;
    }
}

/// Completes a running best when some distances were infinite (they never beat
/// the initial infinity): the lowest such indices fill the empty places.
#[inline(always)]
pub(crate) fn finish(mut s: Nearest, k: usize) -> Nearest {
    if s.best == NO_SECOND {
        s.best = 0;
    }
    if k >= 2 && s.second == NO_SECOND {
        s.second = if s.best == 0 { 1 } else { 0 };
    }
    s
}

/// Squared distance accumulated in f32 one feature after the other, exactly as
/// [`crate::reference::squared_distance`].
#[inline(always)]
fn seq_sq_dist(x: &[f32], c: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (a, b) in x.iter().zip(c) {
        let t = a - b;
        acc += t * t;
    }
    acc
}

/// Squared distance with [`LANES`] independent accumulators (vectorises), summed
/// in a fixed tree.
#[inline(always)]
fn lane_sq_dist(x: &[f32], c: &[f32]) -> f32 {
    let (xc, xr) = x.as_chunks::<LANES>();
    let (cc, cr) = c.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (a, b) in xc.iter().zip(cc) {
        for l in 0..LANES {
            let t = a[l] - b[l];
            acc[l] += t * t;
        }
    }
    for (l, (a, b)) in xr.iter().zip(cr).enumerate() {
        let t = a - b;
        acc[l] += t * t;
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// Squared norm, with the same accumulators as [`lane_sq_dist`].
#[inline(always)]
fn lane_sq_norm(x: &[f32]) -> f32 {
    let (xc, xr) = x.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for a in xc {
        for l in 0..LANES {
            acc[l] += a[l] * a[l];
        }
    }
    for (l, a) in xr.iter().enumerate() {
        acc[l] += a * a;
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

// ---------------------------------------------------------------------------
// Small d: direct distances.

/// Nearest and second nearest of `x` among all centroids, by direct distances.
#[inline(always)]
fn nearest_direct(x: &[f32], centroids: &[f32], d: usize, k: usize) -> Nearest {
    let mut s = EMPTY;
    for (j, c) in centroids.chunks_exact(d).enumerate() {
        offer(&mut s, j as u32, seq_sq_dist(x, c));
    }
    finish(s, k)
}

/// The direct loop with `d` known at compile time, so it is fully unrolled.
fn direct_tiles<const D: usize>(points: &[f32], centroids: &[f32], k: usize, out: &mut [Nearest]) {
    out.par_chunks_mut(TILE_ROWS)
        .zip(points.par_chunks(TILE_ROWS * D))
        .for_each(|(out, tile)| {
            for (o, x) in out.iter_mut().zip(tile.chunks_exact(D)) {
                *o = nearest_direct(x, centroids, D, k);
            }
        });
}

fn assign_direct(points: &[f32], d: usize, centroids: &[f32], k: usize, out: &mut [Nearest]) {
    macro_rules! by_d {
        ($($n:literal)*) => {
            match d {
                $($n => direct_tiles::<$n>(points, centroids, k, out),)*
                _ => out
                    .par_chunks_mut(TILE_ROWS)
                    .zip(points.par_chunks(TILE_ROWS * d))
                    .for_each(|(out, tile)| {
                        for (o, x) in out.iter_mut().zip(tile.chunks_exact(d)) {
                            *o = nearest_direct(x, centroids, d, k);
                        }
                    }),
            }
        };
    }
    by_d!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
}

// ---------------------------------------------------------------------------
// Larger d: GEMM on tiles.

/// Centroids prepared once per `assign` for the GEMM path.
pub(crate) struct ShiftedCentroids {
    /// Mean of the centroids, subtracted from points and centroids.
    pub(crate) shift: Vec<f32>,
    /// `centroid - shift`, row-major `k x d`.
    pub(crate) values: Vec<f32>,
    /// Squared norms of `values`.
    pub(crate) norms: Vec<f32>,
}

impl ShiftedCentroids {
    pub(crate) fn new(centroids: &[f32], d: usize, k: usize) -> Self {
        let mut mean = vec![0.0f64; d];
        for c in centroids.chunks_exact(d) {
            for (m, &v) in mean.iter_mut().zip(c) {
                *m += f64::from(v);
            }
        }
        let shift: Vec<f32> = mean.iter().map(|&m| (m / k as f64) as f32).collect();
        let values: Vec<f32> = centroids
            .chunks_exact(d)
            .flat_map(|c| c.iter().zip(&shift).map(|(&v, &s)| v - s))
            .collect();
        let norms = values.chunks_exact(d).map(lane_sq_norm).collect();
        ShiftedCentroids {
            shift,
            values,
            norms,
        }
    }
}

/// Per-task buffers of the GEMM path.
struct GemmScratch {
    /// The tile minus the shift, row-major `TILE_ROWS x d`.
    points: Vec<f32>,
    /// Squared norms of `points`.
    norms: Vec<f32>,
    /// Dot products of the tile with a block of centroids, `TILE_ROWS x CENTROID_BLOCK`.
    dots: Vec<f32>,
}

impl GemmScratch {
    fn new(d: usize) -> Self {
        GemmScratch {
            points: vec![0.0; TILE_ROWS * d],
            norms: vec![0.0; TILE_ROWS],
            dots: vec![0.0; TILE_ROWS * CENTROID_BLOCK],
        }
    }
}

/// Nearest and second nearest of every row of `points` (checked inputs), on the
/// direct path up to [`DIRECT_MAX_D`] features and the GEMM path above.
pub(crate) fn assign_rows(
    points: &[f32],
    d: usize,
    centroids: &[f32],
    k: usize,
    out: &mut [Nearest],
) {
    if out.is_empty() {
        return;
    }
    if d > DIRECT_MAX_D {
        assign_gemm(points, d, centroids, k, out);
    } else {
        assign_direct(points, d, centroids, k, out);
    }
}

/// The AVX-512 kernel's own values for one point (see [`kernel_values`]): its
/// best and second best by the expanded form, before [`refine`] and [`finish`],
/// and the squared norm of the shifted point. When `norm` is not below the
/// kernel's overflow limit, `near` is instead the point's final result (by direct
/// distances, as `assign` gives it) and `norm` is +inf.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Raw {
    pub(crate) near: Nearest,
    pub(crate) norm: f32,
}

/// Whether [`kernel_values`] runs on this CPU for `d` features: only the AVX-512
/// kernel (chosen above [`DIRECT_MAX_D`] features) hands out its own values.
pub(crate) fn kernel_values_available(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return d > DIRECT_MAX_D && lanes::available();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

#[cfg(target_arch = "x86_64")]
pub(crate) use lanes::{KernelPass, Rows, Scratch as KernelScratch, TILE as KERNEL_TILE};

/// What `assign` makes of a point's kernel values (`raw.norm` below the limit):
/// the best and second best by direct distances, completed. Where
/// [`kernel_values_available`] holds.
pub(crate) fn refine_finish(near: Nearest, x: &[f32], centroids: &[f32], k: usize) -> Nearest {
    let mut s = near;
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            fused::available(),
            "the AVX2 refinement runs only with AVX2 and FMA"
        );
        // SAFETY: the CPU runs AVX2 and FMA (asserted just above).
        unsafe { fused::refine_avx(&mut s, x, centroids, x.len()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    refine(&mut s, x, centroids, x.len());
    finish(s, k)
}

fn assign_gemm(points: &[f32], d: usize, centroids: &[f32], k: usize, out: &mut [Nearest]) {
    #[cfg(target_arch = "x86_64")]
    if lanes::available() {
        lanes::assign(points, d, centroids, k, out);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if fused::available() {
        fused::assign(points, d, centroids, k, out);
        return;
    }
    assign_gemm_portable(points, d, centroids, k, out);
}

/// The GEMM path on any CPU: `matrixmultiply` on tiles, then a scan of the dots.
fn assign_gemm_portable(
    points: &[f32],
    d: usize,
    centroids: &[f32],
    k: usize,
    out: &mut [Nearest],
) {
    let shifted = ShiftedCentroids::new(centroids, d, k);
    out.par_chunks_mut(TILE_ROWS)
        .zip(points.par_chunks(TILE_ROWS * d))
        .for_each_init(
            || GemmScratch::new(d),
            |scratch, (out, tile)| gemm_tile(tile, d, centroids, &shifted, k, out, scratch),
        );
}

/// Nearest and second nearest of the `out.len()` points of `tile`.
fn gemm_tile(
    tile: &[f32],
    d: usize,
    centroids: &[f32],
    shifted: &ShiftedCentroids,
    k: usize,
    out: &mut [Nearest],
    scratch: &mut GemmScratch,
) {
    let m = out.len();
    debug_assert_eq!(tile.len(), m * d);

    let xs = &mut scratch.points[..m * d];
    for (dst, src) in xs.chunks_exact_mut(d).zip(tile.chunks_exact(d)) {
        for ((t, &v), &s) in dst.iter_mut().zip(src).zip(&shifted.shift) {
            *t = v - s;
        }
    }
    let xs = &*xs;
    let x_norms = &mut scratch.norms[..m];
    for (norm, x) in x_norms.iter_mut().zip(xs.chunks_exact(d)) {
        *norm = lane_sq_norm(x);
    }

    out.fill(EMPTY);
    let blocks = shifted
        .values
        .chunks(CENTROID_BLOCK * d)
        .zip(shifted.norms.chunks(CENTROID_BLOCK));
    for (b, (block, c_norms)) in blocks.enumerate() {
        let first = b * CENTROID_BLOCK;
        let nb = c_norms.len();
        let dots = &mut scratch.dots[..m * nb];
        // SAFETY: sgemm reads A = `xs` as m x d with strides (d, 1): its last
        // element is at (m-1)*d + d-1 < xs.len() = m*d. It reads B as the d x nb
        // matrix whose column j is centroid `first + j` of `block`, with strides
        // (1, d): last element at (d-1) + (nb-1)*d < block.len() = nb*d. It writes
        // C = `dots` as m x nb with strides (nb, 1): last element at (m-1)*nb +
        // nb-1 < dots.len() = m*nb. `dots` is borrowed mutably here, so it aliases
        // neither input; beta = 0, so its old contents are never read.
        unsafe {
            matrixmultiply::sgemm(
                m,
                d,
                nb,
                1.0,
                xs.as_ptr(),
                d as isize,
                1,
                block.as_ptr(),
                1,
                d as isize,
                0.0,
                dots.as_mut_ptr(),
                nb as isize,
                1,
            );
        }
        for (i, (s, row)) in out.iter_mut().zip(dots.chunks_exact(nb)).enumerate() {
            let x_norm = x_norms[i];
            for (jj, (&dot, &c_norm)) in row.iter().zip(c_norms).enumerate() {
                let j = first + jj;
                let mut dist = (x_norm - 2.0 * dot) + c_norm;
                if !dist.is_finite() {
                    // Overflow in the expanded form (huge features): the direct
                    // form overflows only if the distance itself does.
                    dist = lane_sq_dist(&tile[i * d..(i + 1) * d], &centroids[j * d..(j + 1) * d]);
                }
                offer(s, j as u32, dist.max(0.0));
            }
        }
    }

    for (s, x) in out.iter_mut().zip(tile.chunks_exact(d)) {
        refine(s, x, centroids, d);
        *s = finish(*s, k);
    }
}

/// Replaces the expanded-form distances of the best and second best by direct
/// ones, and restores their order.
#[inline(always)]
fn refine(s: &mut Nearest, x: &[f32], centroids: &[f32], d: usize) {
    // (No closure here: it would not inherit `inline(always)` and the AVX code of
    // the fused path.)
    if s.best != NO_SECOND {
        let j = s.best as usize;
        s.best_dist = lane_sq_dist(x, &centroids[j * d..(j + 1) * d]);
    }
    if s.second != NO_SECOND {
        let j = s.second as usize;
        s.second_dist = lane_sq_dist(x, &centroids[j * d..(j + 1) * d]);
        if s.second_dist < s.best_dist || (s.second_dist == s.best_dist && s.second < s.best) {
            std::mem::swap(&mut s.best, &mut s.second);
            std::mem::swap(&mut s.best_dist, &mut s.second_dist);
        }
    }
}

// ---------------------------------------------------------------------------
// Larger d on x86-64 with AVX2 + FMA: a fused distance + top-2 kernel.

/// The fused assignment kernel for x86-64 CPUs with AVX2 and FMA (chosen at run
/// time; other CPUs take [`gemm_tile`]).
///
/// Centroids are shifted as in [`ShiftedCentroids`], multiplied by −2 and packed
/// in panels of [`fused::NR`] centroids (feature-major inside a panel), so that a
/// panel row is two AVX registers. Points go through in micro-tiles of
/// [`fused::MR`] rows, shifted into a small buffer just before use (the next
/// micro-tile is prefetched meanwhile). For every panel the kernel accumulates the
/// `MR x NR` products `−2 x·c` in registers, one FMA per feature in feature order,
/// turns them into `(‖x‖² − 2x·c) + ‖c‖²` (clamped at 0) and updates, lane by lane,
/// a running best and second best kept in registers: the `n x k` distances are
/// never stored. The lanes are then merged in (distance, index) order, which gives
/// what offering the centroids one by one in index order gives, and [`refine`]
/// (here [`fused::refine_avx`], the same arithmetic) and [`finish`] complete the
/// result as on the other path.
///
/// A point's dot products are the same chain of FMAs whatever the other rows of
/// its micro-tile (padding rows are zeros), so its result depends on nothing but
/// the point and the centroids.
///
/// The expanded form cannot overflow when every squared norm is below
/// [`fused::NORM_LIMIT`] (Cauchy–Schwarz bounds every partial dot product by the
/// norms): a point above it, or every point when a centroid is above it, gets all
/// its distances directly instead.
#[cfg(target_arch = "x86_64")]
#[cfg(target_arch = "x86_64")]
pub(crate) mod fused {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{EMPTY, ShiftedCentroids, finish, lane_sq_dist, offer, refine};
    use crate::{NO_SECOND, Nearest};

    /// Rows of a micro-tile.
    pub(crate) const MR: usize = 6;
    /// Centroids of a panel (two AVX registers of f32).
    pub(crate) const NR: usize = 16;
    /// Points per parallel work item (a multiple of `MR`).
    const TILE: usize = 44 * MR;
    /// Bytes of packed centroids visited per pass over a tile: with the tile
    /// itself they stay in the L2 cache. Fewer centroids take one pass, and their
    /// running results never leave the registers.
    const BLOCK_BYTES: usize = 192 << 10;
    /// Squared norms below this keep the expanded form finite: every partial sum
    /// of products stays below `2 * NORM_LIMIT`, the distance below `4 * NORM_LIMIT`.
    pub(crate) const NORM_LIMIT: f32 = 1e37;

    /// True when this CPU can run the kernel.
    pub(crate) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Centroids packed for the kernel.
    struct Packed {
        /// Panels: `panels x d x NR`, values `−2 (c − shift)`, zero padding.
        values: Vec<f32>,
        /// `panels x NR` squared norms of `c − shift`; +inf for padding, so a
        /// padding column never wins.
        norms: Vec<f32>,
        panels: usize,
    }

    impl Packed {
        fn new(shifted: &ShiftedCentroids, d: usize, k: usize) -> Packed {
            let panels = k.div_ceil(NR);
            let mut values = vec![0.0f32; panels * d * NR];
            let mut norms = vec![f32::INFINITY; panels * NR];
            for (j, c) in shifted.values.chunks_exact(d).enumerate() {
                let (p, lane) = (j / NR, j % NR);
                for (f, &v) in c.iter().enumerate() {
                    values[(p * d + f) * NR + lane] = -2.0 * v;
                }
                norms[j] = shifted.norms[j];
            }
            Packed {
                values,
                norms,
                panels,
            }
        }
    }

    /// Running best and second best of one point between passes over centroid
    /// blocks, per lane: lane `l` has seen centroids `l`, `l + 8`, `l + 16`, … in
    /// that order. Indices are stored as the bits of the f32 lanes.
    #[derive(Clone, Copy)]
    #[repr(C, align(32))]
    struct Lanes([[f32; 8]; 4]);

    /// Per-task buffers.
    struct Scratch {
        /// One micro-tile minus the shift, `MR x d`, zero rows as padding.
        xs: Vec<f32>,
        /// Running results of the tile's micro-tiles between centroid blocks.
        carry: Vec<[Lanes; MR]>,
        /// Squared norms of the tile's shifted points.
        norms: Vec<f32>,
    }

    pub(crate) fn assign(
        points: &[f32],
        d: usize,
        centroids: &[f32],
        k: usize,
        out: &mut [Nearest],
    ) {
        let shifted = ShiftedCentroids::new(centroids, d, k);
        let packed = Packed::new(&shifted, d, k);
        // A centroid too far out for the expanded form: every distance directly.
        let direct_only = shifted.norms.iter().any(|&v| v.is_nan() || v >= NORM_LIMIT);
        let panels_per_block = (BLOCK_BYTES / (d * NR * 4)).max(1);
        out.par_chunks_mut(TILE)
            .zip(points.par_chunks(TILE * d))
            .for_each_init(
                || Scratch {
                    xs: vec![0.0; MR * d],
                    carry: vec![[Lanes([[0.0; 8]; 4]); MR]; TILE / MR],
                    norms: vec![0.0; TILE],
                },
                |scratch, (out, tile)| {
                    if direct_only {
                        for (o, x) in out.iter_mut().zip(tile.chunks_exact(d)) {
                            *o = nearest_direct(x, centroids, d, k);
                        }
                    } else {
                        // SAFETY: this path is only taken where `available()` holds
                        // (see `assign_gemm`), so the CPU runs AVX2 and FMA.
                        unsafe {
                            fused_tile(
                                tile,
                                d,
                                centroids,
                                &shifted,
                                &packed,
                                panels_per_block,
                                k,
                                out,
                                scratch,
                            )
                        }
                    }
                },
            );
    }

    /// Nearest and second nearest by direct distances (far-out points).
    pub(crate) fn nearest_direct(x: &[f32], centroids: &[f32], d: usize, k: usize) -> Nearest {
        let mut s = EMPTY;
        for (j, c) in centroids.chunks_exact(d).enumerate() {
            offer(&mut s, j as u32, lane_sq_dist(x, c));
        }
        refine(&mut s, x, centroids, d);
        finish(s, k)
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn fused_tile(
        tile: &[f32],
        d: usize,
        centroids: &[f32],
        shifted: &ShiftedCentroids,
        packed: &Packed,
        panels_per_block: usize,
        k: usize,
        out: &mut [Nearest],
        scratch: &mut Scratch,
    ) {
        let m = out.len();
        debug_assert_eq!(tile.len(), m * d);
        let norms = &mut scratch.norms[..m];
        let row = |i: usize| &tile[i * d..(i + 1) * d];

        let mut first_panel = 0;
        while first_panel < packed.panels {
            let last_panel = (first_panel + panels_per_block).min(packed.panels);
            let (first, last) = (first_panel == 0, last_panel == packed.panels);
            for r0 in (0..m).step_by(MR) {
                let rows = (m - r0).min(MR);
                // The next micro-tile's rows, from memory while this one computes.
                let ahead =
                    &tile[((r0 + MR) * d).min(tile.len())..((r0 + 2 * MR) * d).min(tile.len())];
                for line in ahead.chunks(16) {
                    _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
                }
                // The micro-tile's rows minus the shift (zero rows as padding),
                // and on the first pass their squared norms.
                let xs = &mut scratch.xs;
                for r in 0..MR {
                    let dst = &mut xs[r * d..(r + 1) * d];
                    if r < rows {
                        let norm = shift_row(row(r0 + r), &shifted.shift, dst);
                        if first {
                            norms[r0 + r] = norm;
                        }
                    } else {
                        dst.fill(0.0);
                    }
                }
                let mut x_norms = [0.0f32; MR];
                x_norms[..rows].copy_from_slice(&norms[r0..r0 + rows]);
                let near = if x_norms[..rows].iter().any(|&v| v < NORM_LIMIT) {
                    let carry = &mut scratch.carry[r0 / MR];
                    micro_tile(
                        xs,
                        d,
                        packed,
                        first_panel..last_panel,
                        &x_norms,
                        carry,
                        first,
                        last,
                    )
                } else {
                    [EMPTY; MR]
                };
                if last {
                    for r in 0..rows {
                        let (x, i) = (row(r0 + r), r0 + r);
                        out[i] = if x_norms[r] < NORM_LIMIT {
                            let mut s = near[r];
                            refine_avx(&mut s, x, centroids, d);
                            finish(s, k)
                        } else {
                            nearest_direct(x, centroids, d, k)
                        };
                    }
                }
            }
            first_panel = last_panel;
        }
    }

    /// Updates the running best / second best of 8 lanes with distances `dist` of
    /// centroids `idx` (index bits in f32 lanes). Strict comparisons: on a tie the
    /// centroid seen first, the lower index, stays.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn update(st: &mut [__m256; 4], dist: __m256, idx: __m256) {
        let [best, best_idx, second, second_idx] = *st;
        let lt_best = _mm256_cmp_ps::<_CMP_LT_OQ>(dist, best);
        let lt_second = _mm256_cmp_ps::<_CMP_LT_OQ>(dist, second);
        let s = _mm256_blendv_ps(second, dist, lt_second);
        let si = _mm256_blendv_ps(second_idx, idx, lt_second);
        *st = [
            _mm256_blendv_ps(best, dist, lt_best),
            _mm256_blendv_ps(best_idx, idx, lt_best),
            _mm256_blendv_ps(s, best, lt_best),
            _mm256_blendv_ps(si, best_idx, lt_best),
        ];
    }

    /// Horizontal minimum of 8 f32, in every lane.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hmin_ps(v: __m256) -> __m256 {
        let t = _mm256_min_ps(v, _mm256_permute2f128_ps::<1>(v, v));
        let t = _mm256_min_ps(t, _mm256_permute_ps::<0b0100_1110>(t));
        _mm256_min_ps(t, _mm256_permute_ps::<0b1011_0001>(t))
    }

    /// Horizontal unsigned minimum of 8 u32, in every lane.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hmin_epu32(v: __m256i) -> __m256i {
        let t = _mm256_min_epu32(v, _mm256_permute2x128_si256::<1>(v, v));
        let t = _mm256_min_epu32(t, _mm256_shuffle_epi32::<0b0100_1110>(t));
        _mm256_min_epu32(t, _mm256_shuffle_epi32::<0b1011_0001>(t))
    }

    /// The smallest (distance, index) pair over the lanes of `(dist, idx)`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn lane_min(dist: __m256, idx: __m256i) -> (__m256, __m256i) {
        let m = hmin_ps(dist);
        let at_min = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(dist, m));
        let none = _mm256_set1_epi32(NO_SECOND as i32);
        (m, hmin_epu32(_mm256_blendv_epi8(none, idx, at_min)))
    }

    /// The two smallest (distance, index) pairs over all lanes: the same as
    /// offering every centroid in index order with strict comparisons. Lanes hold
    /// only finite distances or (+inf, `NO_SECOND`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn merge(st: &[__m256; 4]) -> Nearest {
        let [b, bi, s, si] = *st;
        let (bi, si) = (_mm256_castps_si256(bi), _mm256_castps_si256(si));
        let (best, best_idx) = lane_min(b, bi);
        // The second best is another lane's best or the best lane's second.
        let best_lane = _mm256_cmpeq_epi32(bi, best_idx);
        let c = _mm256_blendv_ps(b, s, _mm256_castsi256_ps(best_lane));
        let ci = _mm256_blendv_epi8(bi, si, best_lane);
        let (second, second_idx) = lane_min(c, ci);
        Nearest {
            best: _mm256_cvtsi256_si32(best_idx) as u32,
            best_dist: _mm256_cvtss_f32(best),
            second: _mm256_cvtsi256_si32(second_idx) as u32,
            second_dist: _mm256_cvtss_f32(second),
        }
    }

    /// One micro-tile (`xs`: `MR x d` shifted rows with squared norms `x_norms`)
    /// against the centroid panels `panels`. The running results start empty on
    /// the `first` block, else from `carry`; after the `last` block they are
    /// merged and returned, else saved to `carry`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn micro_tile(
        xs: &[f32],
        d: usize,
        packed: &Packed,
        panels: std::ops::Range<usize>,
        x_norms: &[f32; MR],
        carry: &mut [Lanes; MR],
        first: bool,
        last: bool,
    ) -> [Nearest; MR] {
        assert!(xs.len() >= MR * d && packed.values.len() >= panels.end * d * NR);
        assert!(packed.norms.len() >= panels.end * NR);
        let zero = _mm256_setzero_ps();
        let inf = _mm256_set1_ps(f32::INFINITY);
        let none = _mm256_castsi256_ps(_mm256_set1_epi32(NO_SECOND as i32));
        let mut st = [[inf, none, inf, none]; MR];
        if !first {
            for (s, c) in st.iter_mut().zip(carry.iter()) {
                // SAFETY: `Lanes` is 32-byte aligned and made of four arrays of 8
                // f32, so each aligned load reads one of them.
                unsafe {
                    *s = [
                        _mm256_load_ps(c.0[0].as_ptr()),
                        _mm256_load_ps(c.0[1].as_ptr()),
                        _mm256_load_ps(c.0[2].as_ptr()),
                        _mm256_load_ps(c.0[3].as_ptr()),
                    ];
                }
            }
        }
        let xp = xs.as_ptr();
        let lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for p in panels {
            let mut acc = [[zero; 2]; MR];
            // SAFETY: panel `p < panels.end` spans `values[p*d*NR .. (p+1)*d*NR]`,
            // within the length asserted above, and every load below reads 8
            // floats at `bp + f*NR` or `bp + f*NR + 8` with `f < d`. `xp + r*d + f`
            // with `r < MR`, `f < d` is within `xs` (asserted `MR * d` long).
            unsafe {
                let bp = packed.values.as_ptr().add(p * d * NR);
                for f in 0..d {
                    let b0 = _mm256_loadu_ps(bp.add(f * NR));
                    let b1 = _mm256_loadu_ps(bp.add(f * NR + 8));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = _mm256_broadcast_ss(&*xp.add(r * d + f));
                        acc[0] = _mm256_fmadd_ps(a, b0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(a, b1, acc[1]);
                    }
                }
            }
            // SAFETY: `p * NR + 16 <= panels.end * NR <= norms.len()` (asserted).
            let (cn0, cn1) = unsafe {
                let np = packed.norms.as_ptr().add(p * NR);
                (_mm256_loadu_ps(np), _mm256_loadu_ps(np.add(8)))
            };
            let idx0 = _mm256_add_epi32(_mm256_set1_epi32((p * NR) as i32), lane_ids);
            let idx1 = _mm256_add_epi32(idx0, _mm256_set1_epi32(8));
            let (idx0, idx1) = (_mm256_castsi256_ps(idx0), _mm256_castsi256_ps(idx1));
            for ((st, acc), &xn) in st.iter_mut().zip(&acc).zip(x_norms) {
                let xn = _mm256_set1_ps(xn);
                // (‖x‖² − 2x·c) + ‖c‖², clamped at 0 (max returns its second
                // operand on NaN, so a NaN would stay NaN and never win).
                let d0 = _mm256_max_ps(zero, _mm256_add_ps(_mm256_add_ps(xn, acc[0]), cn0));
                let d1 = _mm256_max_ps(zero, _mm256_add_ps(_mm256_add_ps(xn, acc[1]), cn1));
                update(st, d0, idx0);
                update(st, d1, idx1);
            }
        }
        if !last {
            for (s, c) in st.iter().zip(carry.iter_mut()) {
                // SAFETY: as for the loads above.
                unsafe {
                    for (v, lane) in s.iter().zip(c.0.iter_mut()) {
                        _mm256_store_ps(lane.as_mut_ptr(), *v);
                    }
                }
            }
            return [EMPTY; MR];
        }
        let mut near = [EMPTY; MR];
        for (n, s) in near.iter_mut().zip(&st) {
            *n = merge(s);
        }
        near
    }

    /// `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`: the final tree of
    /// [`lane_sq_dist`] and [`super::lane_sq_norm`], in registers.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn tree_sum(v: __m256) -> f32 {
        let h = _mm256_add_ps(v, _mm256_permute2f128_ps::<1>(v, v));
        let q = _mm256_add_ps(h, _mm256_permute_ps::<0b0100_1110>(h));
        _mm256_cvtss_f32(_mm256_add_ps(q, _mm256_permute_ps::<0b1011_0001>(q)))
    }

    /// The lanes `l < len % 8`, those of the last, partial chunk of 8.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn tail_mask(len: usize) -> __m256i {
        let rem = (len % 8) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(rem),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// The last `x.len() % 8` values of `x` in the low lanes, zeros above.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn load_tail(x: &[f32], mask: __m256i) -> __m256 {
        let start = x.len() / 8 * 8;
        // SAFETY: the mask selects lanes `l < x.len() % 8`, i.e. elements
        // `start + l < x.len()`; masked-out lanes are not read.
        unsafe { _mm256_maskload_ps(x.as_ptr().add(start), mask) }
    }

    /// [`lane_sq_dist`] bit for bit (the same eight accumulators, multiply then
    /// add, the same tree; adding the zeros of the masked tail changes nothing)
    /// of `x` to `c1` and to `c2`, as two independent chains.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn sq_dist2(x: &[f32], c1: &[f32], c2: &[f32]) -> (f32, f32) {
        let (xc, _) = x.as_chunks::<8>();
        let (c1c, _) = c1.as_chunks::<8>();
        let (c2c, _) = c2.as_chunks::<8>();
        let mut acc1 = _mm256_setzero_ps();
        let mut acc2 = _mm256_setzero_ps();
        for ((a, b1), b2) in xc.iter().zip(c1c).zip(c2c) {
            // SAFETY: `a`, `b1`, `b2` are arrays of 8 f32: each load reads one.
            let (xa, t1, t2) = unsafe {
                let xa = _mm256_loadu_ps(a.as_ptr());
                (
                    xa,
                    _mm256_loadu_ps(b1.as_ptr()),
                    _mm256_loadu_ps(b2.as_ptr()),
                )
            };
            let (t1, t2) = (_mm256_sub_ps(xa, t1), _mm256_sub_ps(xa, t2));
            acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(t1, t1));
            acc2 = _mm256_add_ps(acc2, _mm256_mul_ps(t2, t2));
        }
        if !x.len().is_multiple_of(8) {
            let mask = tail_mask(x.len());
            let xa = load_tail(x, mask);
            let t1 = _mm256_sub_ps(xa, load_tail(c1, mask));
            let t2 = _mm256_sub_ps(xa, load_tail(c2, mask));
            acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(t1, t1));
            acc2 = _mm256_add_ps(acc2, _mm256_mul_ps(t2, t2));
        }
        (tree_sum(acc1), tree_sum(acc2))
    }

    /// Writes `x − shift` to `dst` and returns its squared norm,
    /// [`super::lane_sq_norm`] bit for bit, in one pass.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn shift_row(x: &[f32], shift: &[f32], dst: &mut [f32]) -> f32 {
        let (xc, _) = x.as_chunks::<8>();
        let (sc, _) = shift.as_chunks::<8>();
        let (dc, _) = dst.as_chunks_mut::<8>();
        let mut acc = _mm256_setzero_ps();
        for ((a, b), t) in xc.iter().zip(sc).zip(dc) {
            // SAFETY: `a`, `b`, `t` are arrays of 8 f32: each access is one of them.
            unsafe {
                let v = _mm256_sub_ps(_mm256_loadu_ps(a.as_ptr()), _mm256_loadu_ps(b.as_ptr()));
                _mm256_storeu_ps(t.as_mut_ptr(), v);
                acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
            }
        }
        let start = x.len() / 8 * 8;
        for ((t, &v), &s) in dst[start..]
            .iter_mut()
            .zip(&x[start..])
            .zip(&shift[start..])
        {
            *t = v - s;
        }
        if !x.len().is_multiple_of(8) {
            let v = load_tail(dst, tail_mask(dst.len()));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
        }
        tree_sum(acc)
    }

    /// [`refine`] bit for bit, with both distances in one pass.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) fn refine_avx(s: &mut Nearest, x: &[f32], centroids: &[f32], d: usize) {
        let row = |j: u32| &centroids[j as usize * d..(j as usize + 1) * d];
        if s.second == NO_SECOND {
            if s.best != NO_SECOND {
                s.best_dist = sq_dist2(x, row(s.best), row(s.best)).0;
            }
            return;
        }
        (s.best_dist, s.second_dist) = sq_dist2(x, row(s.best), row(s.second));
        if s.second_dist < s.best_dist || (s.second_dist == s.best_dist && s.second < s.best) {
            std::mem::swap(&mut s.best, &mut s.second);
            std::mem::swap(&mut s.best_dist, &mut s.second_dist);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::{lane_sq_dist, lane_sq_norm};
        use super::*;

        #[test]
        fn register_helpers_match_the_portable_ones_bit_for_bit() {
            if !available() {
                return;
            }
            let mut z = 0x2545_F491_4F6C_DD1Du64;
            let mut value = || {
                z ^= z << 13;
                z ^= z >> 7;
                z ^= z << 17;
                ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2f32.powi((z % 16) as i32 - 8)
            };
            for d in 1..=40 {
                let x: Vec<f32> = (0..d).map(|_| value()).collect();
                let c1: Vec<f32> = (0..d).map(|_| value()).collect();
                let c2: Vec<f32> = (0..d).map(|_| value()).collect();
                // SAFETY: `available()` holds.
                let mut copy = vec![0.0; d];
                // SAFETY: `available()` holds.
                let (a, b, n) = unsafe {
                    (
                        sq_dist2(&x, &c1, &c2),
                        sq_dist2(&x, &c2, &c1),
                        shift_row(&x, &vec![0.0; d], &mut copy),
                    )
                };
                assert_eq!(a.0.to_bits(), lane_sq_dist(&x, &c1).to_bits(), "d={d}");
                assert_eq!(a.1.to_bits(), lane_sq_dist(&x, &c2).to_bits(), "d={d}");
                assert_eq!(
                    (b.1.to_bits(), b.0.to_bits()),
                    (a.0.to_bits(), a.1.to_bits()),
                    "d={d}"
                );
                assert_eq!(n.to_bits(), lane_sq_norm(&x).to_bits(), "d={d}");
                let mut shifted = vec![0.0; d];
                // SAFETY: `available()` holds.
                let norm = unsafe { shift_row(&x, &c1, &mut shifted) };
                let want: Vec<f32> = x.iter().zip(&c1).map(|(a, b)| a - b).collect();
                assert_eq!(shifted, want, "d={d}");
                assert_eq!(norm.to_bits(), lane_sq_norm(&want).to_bits(), "d={d}");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::reference;
    use crate::{Backend, CpuBackend, KernelError, Resident};

    /// splitmix64: small, deterministic, good enough for test data.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [-1, 1).
        pub(crate) fn unit(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
        pub(crate) fn values(&mut self, len: usize) -> Vec<f32> {
            (0..len).map(|_| self.unit()).collect()
        }
    }

    fn bits(n: &Nearest) -> (u32, u32, u32, u32) {
        (
            n.best,
            n.best_dist.to_bits(),
            n.second,
            n.second_dist.to_bits(),
        )
    }

    fn close(got: f32, want: f32) -> bool {
        (got == want) || (got - want).abs() <= 1e-4 * want.abs() + 1e-5
    }

    fn cpu_assign(points: &[f32], d: usize, centroids: &[f32], k: usize) -> Vec<Nearest> {
        let cpu = CpuBackend::new();
        let resident = cpu.upload(points, d).unwrap();
        let mut out = vec![Nearest::default(); resident.n()];
        cpu.assign(&resident, centroids, k, &mut out).unwrap();
        out
    }

    /// Checks one backend result against the reference. Indices may differ only
    /// on a near-tie: the distance (by the reference) to the centroid the backend
    /// chose must equal the reference's within tolerance.
    fn check_against_reference(
        points: &[f32],
        d: usize,
        centroids: &[f32],
        k: usize,
        got: &[Nearest],
        what: &str,
    ) {
        let want = reference::assign(points, d, centroids, k);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let x = &points[i * d..(i + 1) * d];
            let ref_dist = |j: u32| {
                reference::squared_distance(x, &centroids[j as usize * d..(j as usize + 1) * d])
            };
            let ctx = || format!("{what}: point {i}: got {g:?}, reference {w:?}");

            assert!((g.best as usize) < k, "{}", ctx());
            assert!(g.best_dist >= 0.0, "{}", ctx());
            assert!(
                close(g.best_dist, w.best_dist),
                "best distance differs: {}",
                ctx()
            );
            if g.best != w.best {
                assert!(
                    close(ref_dist(g.best), w.best_dist),
                    "best differs without a near-tie: {}",
                    ctx()
                );
            }
            if k == 1 {
                assert_eq!(g.second, NO_SECOND, "{}", ctx());
                assert_eq!(g.second_dist, f32::INFINITY, "{}", ctx());
                continue;
            }
            assert!((g.second as usize) < k && g.second != g.best, "{}", ctx());
            assert!(g.second_dist >= g.best_dist, "{}", ctx());
            assert!(
                close(g.second_dist, w.second_dist),
                "second distance differs: {}",
                ctx()
            );
            if g.second != w.second {
                assert!(
                    close(ref_dist(g.second), w.second_dist),
                    "second differs without a near-tie: {}",
                    ctx()
                );
            }
        }
    }

    #[test]
    fn several_centroid_blocks_match_reference() {
        // d = 300 and k = 200, d = 1000 and k = 70: the fused kernel goes over the
        // centroids in more than one block, carrying the running results between.
        let mut rng = Rng(21);
        for &(n, d, k) in &[(140, 300, 200), (40, 1000, 70)] {
            let points = rng.values(n * d);
            let centroids = rng.values(k * d);
            let got = cpu_assign(&points, d, &centroids, k);
            check_against_reference(
                &points,
                d,
                &centroids,
                k,
                &got,
                &format!("blocks n={n} d={d} k={k}"),
            );
            for &i in &[0, 7, n - 1] {
                let alone = cpu_assign(&points[i * d..(i + 1) * d], d, &centroids, k);
                assert_eq!(bits(&alone[0]), bits(&got[i]), "d={d}, point {i}");
            }
        }
    }

    #[test]
    fn a_point_too_far_for_the_expanded_form_gets_direct_distances() {
        // One point at 1e19 in every feature (its squared norm overflows f32) among
        // ordinary points and centroids: it gets the direct distances (infinite
        // here, so the lowest indices), and its neighbours are unaffected.
        let mut rng = Rng(22);
        let (n, d, k) = (20, 64, 9);
        let mut points = rng.values(n * d);
        points[5 * d..6 * d].fill(1e19);
        let centroids = rng.values(k * d);
        let got = cpu_assign(&points, d, &centroids, k);
        assert_eq!(
            got[5],
            reference::assign(&points[5 * d..6 * d], d, &centroids, k)[0]
        );
        for i in (0..n).filter(|&i| i != 5) {
            let alone = cpu_assign(&points[i * d..(i + 1) * d], d, &centroids, k);
            assert_eq!(bits(&alone[0]), bits(&got[i]), "point {i}");
        }
        let ordinary: Vec<f32> = points[..5 * d].to_vec();
        check_against_reference(&ordinary, d, &centroids, k, &got[..5], "beside a far point");
    }

    #[test]
    fn portable_gemm_path_matches_reference() {
        // On x86-64 with AVX2 and FMA, `assign` takes the fused kernel: test the
        // other path directly.
        let mut rng = Rng(17);
        for &(n, d, k) in &[(300, 17, 7), (513, 64, 130), (100, 300, 20)] {
            let points = rng.values(n * d);
            let centroids = rng.values(k * d);
            let mut got = vec![Nearest::default(); n];
            assign_gemm_portable(&points, d, &centroids, k, &mut got);
            check_against_reference(
                &points,
                d,
                &centroids,
                k,
                &got,
                &format!("portable n={n} d={d} k={k}"),
            );
        }
    }

    #[test]
    fn assign_matches_reference_on_random_data() {
        let mut rng = Rng(1);
        for &n in &[1, 255, 256, 257, 1000] {
            for &d in &[1, 2, 3, 7, 16, 17, 64, 100] {
                for &k in &[1, 2, 7, 130] {
                    let points = rng.values(n * d);
                    let centroids = rng.values(k * d);
                    let got = cpu_assign(&points, d, &centroids, k);
                    check_against_reference(
                        &points,
                        d,
                        &centroids,
                        k,
                        &got,
                        &format!("n={n} d={d} k={k}"),
                    );
                }
            }
        }
    }

    #[test]
    fn assign_is_accurate_for_features_far_from_zero() {
        // Values near 1000 with a spread of 1: the expanded form without the shift
        // would lose the distances in the rounding of ‖x‖² ≈ 6.4e7.
        let mut rng = Rng(2);
        let (n, d, k) = (500, 64, 20);
        let points: Vec<f32> = rng.values(n * d).iter().map(|v| 1000.0 + v).collect();
        let centroids: Vec<f32> = rng.values(k * d).iter().map(|v| 1000.0 + 0.3 * v).collect();
        let got = cpu_assign(&points, d, &centroids, k);
        check_against_reference(&points, d, &centroids, k, &got, "offset data");
    }

    #[test]
    fn direct_path_is_bit_identical_to_reference() {
        let mut rng = Rng(3);
        for d in 1..=DIRECT_MAX_D {
            let (n, k) = (300, 9);
            let points = rng.values(n * d);
            let centroids = rng.values(k * d);
            let got = cpu_assign(&points, d, &centroids, k);
            let want = reference::assign(&points, d, &centroids, k);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(bits(g), bits(w), "d={d}: {g:?} vs {w:?}");
            }
        }
    }

    #[test]
    fn duplicate_centroids_tie_to_lowest_index() {
        let mut rng = Rng(4);
        for &d in &[3, 64] {
            let distinct = rng.values(5 * d);
            // Centroid j is copy `pattern[j]` of the distinct ones.
            let pattern = [1, 0, 1, 3, 2, 0, 4, 3, 1, 2, 4, 4];
            let k = pattern.len();
            let centroids: Vec<f32> = pattern
                .iter()
                .flat_map(|&p| distinct[p * d..(p + 1) * d].to_vec())
                .collect();
            let first_of = |p: usize| pattern.iter().position(|&q| q == p).unwrap();
            let second_of = |p: usize| {
                first_of(p)
                    + 1
                    + pattern[first_of(p) + 1..]
                        .iter()
                        .position(|&q| q == p)
                        .unwrap()
            };

            let points = rng.values(600 * d);
            let got = cpu_assign(&points, d, &centroids, k);
            check_against_reference(
                &points,
                d,
                &centroids,
                k,
                &got,
                &format!("duplicates d={d}"),
            );
            for g in &got {
                let p = pattern[g.best as usize];
                assert_eq!(g.best as usize, first_of(p), "d={d}: {g:?}");
                assert_eq!(g.second as usize, second_of(p), "d={d}: {g:?}");
                assert_eq!(
                    g.best_dist.to_bits(),
                    g.second_dist.to_bits(),
                    "d={d}: {g:?}"
                );
            }
        }
    }

    #[test]
    fn duplicate_points_get_identical_results() {
        let mut rng = Rng(5);
        for &d in &[3, 64] {
            let k = 10;
            let distinct = rng.values(7 * d);
            let picks: Vec<usize> = (0..900).map(|_| rng.below(7)).collect();
            let points: Vec<f32> = picks
                .iter()
                .flat_map(|&p| distinct[p * d..(p + 1) * d].to_vec())
                .collect();
            let centroids = rng.values(k * d);
            let got = cpu_assign(&points, d, &centroids, k);
            check_against_reference(
                &points,
                d,
                &centroids,
                k,
                &got,
                &format!("duplicate points d={d}"),
            );
            let alone = cpu_assign(&distinct, d, &centroids, k);
            for (g, &p) in got.iter().zip(&picks) {
                assert_eq!(bits(g), bits(&alone[p]), "d={d}");
            }
        }
    }

    #[test]
    fn single_centroid_has_no_second() {
        let mut rng = Rng(6);
        for &d in &[1, 3, 64] {
            let points = rng.values(257 * d);
            let centroid = rng.values(d);
            let got = cpu_assign(&points, d, &centroid, 1);
            check_against_reference(&points, d, &centroid, 1, &got, &format!("k=1 d={d}"));
            assert!(
                got.iter().all(|g| g.best == 0
                    && g.second == NO_SECOND
                    && g.second_dist == f32::INFINITY)
            );
        }
    }

    #[test]
    fn centroids_equal_to_points_are_found_at_distance_zero() {
        // k = n: every point is a centroid.
        let mut rng = Rng(7);
        for &d in &[1, 3, 64, 100] {
            let n = 257;
            let points = rng.values(n * d);
            let got = cpu_assign(&points, d, &points, n);
            check_against_reference(&points, d, &points, n, &got, &format!("k=n d={d}"));
            for (i, g) in got.iter().enumerate() {
                // Random f32 features: no two points coincide, even at d = 1.
                assert_eq!((g.best as usize, g.best_dist), (i, 0.0), "d={d}: {g:?}");
                assert!(g.second_dist > 0.0, "d={d}: {g:?}");
            }
        }
    }

    #[test]
    fn many_centroid_blocks() {
        let mut rng = Rng(8);
        let (n, d, k) = (300, 40, 3 * CENTROID_BLOCK + 5);
        let points = rng.values(n * d);
        let centroids = rng.values(k * d);
        let got = cpu_assign(&points, d, &centroids, k);
        check_against_reference(&points, d, &centroids, k, &got, "many blocks");
    }

    #[test]
    fn overflowing_distances_are_infinite_not_nan() {
        for &d in &[2, 64] {
            // The point sits on centroid 2; centroids 0 and 1 are out of f32 range.
            let point = vec![1e20f32; d];
            let mut centroids = vec![-1e20f32; 2 * d];
            centroids.extend(&point);
            let got = cpu_assign(&point, d, &centroids, 3);
            let want = Nearest {
                best: 2,
                best_dist: 0.0,
                second: 0,
                second_dist: f32::INFINITY,
            };
            assert_eq!(got, vec![want], "d={d}");
            assert_eq!(got, reference::assign(&point, d, &centroids, 3), "d={d}");

            // Every centroid at infinity: lowest indices.
            let got = cpu_assign(&point, d, &centroids[..2 * d], 2);
            assert_eq!(
                got,
                reference::assign(&point, d, &centroids[..2 * d], 2),
                "d={d}"
            );
            assert_eq!((got[0].best, got[0].second), (0, 1), "d={d}");
        }
    }

    #[test]
    fn same_point_same_bits_alone_or_in_a_batch() {
        let mut rng = Rng(9);
        // 300 > the 256 features of one matrixmultiply depth block.
        for &d in &[3, 17, 64, 300] {
            let k = 150;
            let n = 1000;
            let centroids = rng.values(k * d);
            let batch = rng.values(n * d);
            let in_batch = cpu_assign(&batch, d, &centroids, k);
            for &i in &[0, 1, 5, 255, 256, 257, 511, 700, n - 1] {
                let alone = cpu_assign(&batch[i * d..(i + 1) * d], d, &centroids, k);
                assert_eq!(bits(&alone[0]), bits(&in_batch[i]), "d={d}, point {i}");
                // And shifted to another place in another batch.
                let mut other = rng.values(40 * d);
                other.extend_from_slice(&batch[i * d..(i + 1) * d]);
                let elsewhere = cpu_assign(&other, d, &centroids, k);
                assert_eq!(bits(&elsewhere[40]), bits(&in_batch[i]), "d={d}, point {i}");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let mut rng = Rng(10);
        let cpu = CpuBackend::new();
        for &d in &[3, 64] {
            let (n, k) = (3 * SUM_CHUNK_ROWS + 77, 12);
            // Magnitudes from 2^-40 to 2^40 make the f64 sums round, so the order of
            // additions shows.
            let points: Vec<f32> = (0..n * d)
                .map(|_| rng.unit() * 2f32.powi(rng.below(81) as i32 - 40))
                .collect();
            let labels: Vec<u32> = (0..n).map(|_| rng.below(k) as u32).collect();
            let centroids = rng.values(k * d);
            let resident = cpu.upload(&points, d).unwrap();

            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let sums = cpu.partial_sums(&resident, &labels, k).unwrap();
                    let mut near = vec![Nearest::default(); n];
                    cpu.assign(&resident, &centroids, k, &mut near).unwrap();
                    (sums, near)
                })
            };
            let (sums1, near1) = run(1);
            for threads in [2, 3] {
                let (sums, near) = run(threads);
                let as_bits =
                    |p: &PartialSums| p.sums.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(as_bits(&sums1), as_bits(&sums), "d={d}, {threads} threads");
                assert_eq!(sums1.counts, sums.counts, "d={d}, {threads} threads");
                let near_bits = |v: &[Nearest]| v.iter().map(bits).collect::<Vec<_>>();
                assert_eq!(
                    near_bits(&near1),
                    near_bits(&near),
                    "d={d}, {threads} threads"
                );
            }
        }
    }

    #[test]
    fn partial_sums_match_reference() {
        let mut rng = Rng(11);
        let cpu = CpuBackend::new();
        for &n in &[
            0,
            1,
            255,
            SUM_CHUNK_ROWS - 1,
            SUM_CHUNK_ROWS,
            SUM_CHUNK_ROWS + 1,
            10_000,
        ] {
            for &(d, k) in &[(1, 1), (3, 5), (64, 7), (2, 300)] {
                let points = rng.values(n * d);
                let labels: Vec<u32> = (0..n).map(|_| rng.below(k) as u32).collect();
                let resident = cpu.upload(&points, d).unwrap();
                let got = cpu.partial_sums(&resident, &labels, k).unwrap();
                let want = reference::partial_sums(&points, d, &labels, k);
                assert_eq!((got.k, got.d), (k, d));
                assert_eq!(got.counts, want.counts, "n={n} d={d} k={k}");
                for (g, w) in got.sums.iter().zip(&want.sums) {
                    assert!(
                        (g - w).abs() <= 1e-9 * w.abs().max(1.0),
                        "n={n} d={d} k={k}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn non_finite_points_are_rejected_with_their_position() {
        let cpu = CpuBackend::new();
        let d = 4;
        for (pos, bad) in [
            (3 * d + 2, f32::NAN),
            (0, f32::INFINITY),
            (8 * d + 3, f32::NEG_INFINITY),
        ] {
            let mut points = Rng(12).values(10 * d);
            points[pos] = bad;
            // A later bad value must not hide the first one.
            points[10 * d - 1] = f32::NAN;
            let err = cpu.upload(&points, d).unwrap_err();
            match err {
                KernelError::NonFinitePoint { row, col, value } => {
                    assert_eq!((row, col), (pos / d, pos % d));
                    assert_eq!(value.to_bits(), bad.to_bits());
                }
                other => panic!("unexpected error {other:?}"),
            }
            let message = err.to_string();
            assert!(
                message.contains(&format!("point {}, feature {}", pos / d, pos % d)),
                "{message}"
            );
        }
    }

    #[test]
    fn non_finite_centroids_are_rejected_with_their_position() {
        let cpu = CpuBackend::new();
        for &d in &[3, 64] {
            let resident = cpu.upload(&Rng(13).values(20 * d), d).unwrap();
            let mut out = vec![Nearest::default(); 20];
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut centroids = Rng(14).values(4 * d);
                centroids[2 * d + 1] = bad;
                match cpu.assign(&resident, &centroids, 4, &mut out) {
                    Err(KernelError::NonFiniteCentroid {
                        row: 2,
                        col: 1,
                        value,
                    }) => {
                        assert_eq!(value.to_bits(), bad.to_bits());
                    }
                    other => panic!("d={d}: unexpected {other:?}"),
                }
            }
        }
    }

    #[test]
    fn shape_errors() {
        let cpu = CpuBackend::new();
        assert!(matches!(
            cpu.upload(&[1.0, 2.0, 3.0], 2),
            Err(KernelError::Shape(_))
        ));
        assert!(matches!(cpu.upload(&[1.0], 0), Err(KernelError::Shape(_))));

        let resident = cpu.upload(&[0.0; 12], 3).unwrap();
        assert_eq!((resident.n(), resident.d()), (4, 3));
        let mut out = vec![Nearest::default(); 4];
        assert!(matches!(
            cpu.assign(&resident, &[], 0, &mut out),
            Err(KernelError::EmptyCentroids)
        ));
        assert!(matches!(
            cpu.assign(&resident, &[0.0; 5], 2, &mut out),
            Err(KernelError::Shape(_))
        ));
        assert!(matches!(
            cpu.assign(&resident, &[0.0; 6], 2, &mut out[..3]),
            Err(KernelError::Shape(_))
        ));
        assert!(cpu.assign(&resident, &[0.0; 6], 2, &mut out).is_ok());

        assert!(matches!(
            cpu.partial_sums(&resident, &[0, 0, 0], 1),
            Err(KernelError::Shape(_))
        ));
        assert!(matches!(
            cpu.partial_sums(&resident, &[0; 4], 0),
            Err(KernelError::EmptyCentroids)
        ));
    }

    #[test]
    fn labels_out_of_range_are_rejected() {
        let cpu = CpuBackend::new();
        let resident = cpu.upload(&Rng(15).values(6 * 2), 2).unwrap();
        let err = cpu
            .partial_sums(&resident, &[0, 1, 2, 3, 1, 0], 3)
            .unwrap_err();
        assert!(matches!(err, KernelError::Shape(_)), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("point 3") && message.contains("label 3"),
            "{message}"
        );
    }

    #[test]
    fn empty_upload_works() {
        let cpu = CpuBackend::new();
        let resident = cpu.upload(&[], 5).unwrap();
        assert_eq!(resident.n(), 0);
        cpu.assign(&resident, &[0.0; 10], 2, &mut []).unwrap();
        assert_eq!(
            cpu.partial_sums(&resident, &[], 2).unwrap(),
            PartialSums::zeros(2, 5)
        );
        assert!(cpu.download_rows(&resident, &[]).unwrap().is_empty());
    }

    #[test]
    fn download_rows_copies_rows_and_rejects_bad_indices() {
        let cpu = CpuBackend::new();
        let points = Rng(16).values(7 * 3);
        let resident = cpu.upload(&points, 3).unwrap();
        let got = cpu.download_rows(&resident, &[6, 0, 6, 2]).unwrap();
        let want: Vec<f32> = [6, 0, 6, 2]
            .iter()
            .flat_map(|&r| points[r * 3..r * 3 + 3].to_vec())
            .collect();
        assert_eq!(got, want);
        assert!(matches!(
            cpu.download_rows(&resident, &[1, 7]),
            Err(KernelError::Shape(_))
        ));
    }

    #[test]
    fn points_of_another_backend_are_rejected() {
        let cpu = CpuBackend::new();
        assert_eq!(cpu.name(), "cpu");
        let foreign = Resident::new(1, 1, "cuda:0", Box::new(()));
        let mut out = vec![Nearest::default()];
        assert!(matches!(
            cpu.assign(&foreign, &[0.0], 1, &mut out),
            Err(KernelError::ForeignPoints("cuda:0"))
        ));
        assert!(matches!(
            cpu.partial_sums(&foreign, &[0], 1),
            Err(KernelError::ForeignPoints(_))
        ));
        assert!(matches!(
            cpu.download_rows(&foreign, &[0]),
            Err(KernelError::ForeignPoints(_))
        ));
        // Right name, wrong storage.
        let wrong = Resident::new(1, 1, "cpu", Box::new(()));
        assert!(matches!(
            cpu.download_rows(&wrong, &[0]),
            Err(KernelError::ForeignPoints(_))
        ));
    }
}
