//! The fused assignment kernel for x86-64 CPUs with AVX-512 (chosen at run time
//! ahead of the AVX2 kernel in `fused`, whose results it gives bit for bit).
//!
//! Points go through in blocks of [`BP`] = 32, one point per lane of two AVX-512
//! registers: a block's rows are read once from memory, shifted (as in
//! [`ShiftedCentroids`]) and transposed into a feature-major scratch (`d x 32`,
//! in the L1 cache) in 16 x 16 register transposes, and their squared norms are
//! summed down the lanes. Then, for every group of [`C`] = 8 centroids, 16
//! accumulators hold the products `−2 x·c` of the 32 points with the 8 centroids:
//! per feature, two loads of the points and 16 FMAs with the centroid values
//! broadcast. The distances `(‖x‖² − 2x·c) + ‖c‖²` (clamped at 0) update, lane by
//! lane, each point's running best and second best, kept in registers for the
//! whole block: with one point per lane the updates are plain vertical compares
//! and blends, and no lanes need merging at the end. While a block computes, the
//! next block's rows are prefetched, a few cache lines per feature step, so that
//! its transpose reads from the cache.
//!
//! Every product is the same FMA `x'_f · (−2c'_f) + acc` in the same feature
//! order as in `fused`, the norms the same lane tree as [`super::lane_sq_norm`],
//! the distances the same three operations, and the centroids are offered in
//! index order with strict comparisons: the kernel values, hence the best and
//! second best, are those of the AVX2 kernel, and [`refine_avx`] and [`finish`]
//! complete them the same way. A point's results depend on nothing but the point
//! and the centroids (padding lanes are zeros and their results are dropped).

use std::arch::x86_64::*;
use std::ops::Range;

use rayon::prelude::*;

use super::assign::fused::{self, NORM_LIMIT, nearest_direct, refine_avx};
use super::assign::{EMPTY, Raw, ShiftedCentroids, finish};
use crate::{NO_SECOND, Nearest};

/// Centroids per group (accumulators per point register).
const C: usize = 8;
/// Points per block: two registers of 16 lanes.
const BP: usize = 32;
/// Points per parallel work item (a multiple of `BP`).
pub(crate) const TILE: usize = 16 * BP;

/// True when this CPU can run the kernel (and the AVX2 helpers it shares).
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f") && fused::available()
}

/// Centroids packed for the kernel.
struct Packed {
    /// Groups: `groups x d x C`, values `−2 (c − shift)`, zero padding.
    values: Vec<f32>,
    /// `groups x C` squared norms of `c − shift`; +inf for padding, so a padding
    /// centroid never wins.
    norms: Vec<f32>,
    groups: usize,
}

impl Packed {
    fn new(shifted: &ShiftedCentroids, d: usize, k: usize) -> Packed {
        let groups = k.div_ceil(C);
        let mut values = vec![0.0f32; groups * d * C];
        let mut norms = vec![f32::INFINITY; groups * C];
        for (j, c) in shifted.values.chunks_exact(d).enumerate() {
            let (g, lane) = (j / C, j % C);
            for (f, &v) in c.iter().enumerate() {
                values[(g * d + f) * C + lane] = -2.0 * v;
            }
            norms[j] = shifted.norms[j];
        }
        Packed {
            values,
            norms,
            groups,
        }
    }
}

/// Per-task buffers.
pub(crate) struct Scratch {
    /// One block minus the shift, feature-major: `d x BP`, zero lanes as padding.
    xt: Vec<f32>,
    /// Squared norms of the block's shifted points.
    norms: [f32; BP],
    /// Addresses of the next block's cache lines.
    lines: Vec<usize>,
}

impl Scratch {
    pub(crate) fn new(d: usize) -> Scratch {
        Scratch {
            xt: vec![0.0; d * BP],
            norms: [0.0; BP],
            lines: Vec::with_capacity(BP * (d / 16 + 2)),
        }
    }
}

/// Centroids prepared for one call.
struct Prepared {
    shifted: ShiftedCentroids,
    packed: Packed,
    /// A centroid too far out for the expanded form: every distance directly.
    direct_only: bool,
}

impl Prepared {
    fn new(centroids: &[f32], d: usize, k: usize) -> Prepared {
        let shifted = ShiftedCentroids::new(centroids, d, k);
        let packed = Packed::new(&shifted, d, k);
        let direct_only = shifted.norms.iter().any(|&v| v.is_nan() || v >= NORM_LIMIT);
        Prepared {
            shifted,
            packed,
            direct_only,
        }
    }
}

/// Nearest and second nearest of every row of `points` (the `fused` contract).
pub(super) fn assign(points: &[f32], d: usize, centroids: &[f32], k: usize, out: &mut [Nearest]) {
    let prep = Prepared::new(centroids, d, k);
    out.par_chunks_mut(TILE)
        .zip(points.par_chunks(TILE * d))
        .for_each_init(
            || Scratch::new(d),
            |scratch, (out, tile)| {
                let (rows, range) = (Rows::Block(tile), 0..out.len());
                // SAFETY: this path is only taken where `available()` holds (see
                // `assign_gemm`): the CPU runs AVX-512F, AVX2 and FMA.
                unsafe {
                    run_tile(
                        &prep,
                        rows,
                        range,
                        d,
                        centroids,
                        k,
                        true,
                        scratch,
                        |i, near, _| out[i] = near,
                    )
                }
            },
        );
}

/// The kernel's own values ([`Raw`]) for given points: the centroids prepared
/// once, then any number of [`KernelPass::values`] calls (from any threads).
pub(crate) struct KernelPass<'c> {
    prep: Prepared,
    centroids: &'c [f32],
    d: usize,
    k: usize,
}

impl<'c> KernelPass<'c> {
    /// Only where [`available`] holds; `centroids` are `k x d`, checked.
    pub(crate) fn new(centroids: &'c [f32], d: usize, k: usize) -> KernelPass<'c> {
        assert!(
            available(),
            "the AVX-512 kernel runs only where `available()` holds"
        );
        KernelPass {
            prep: Prepared::new(centroids, d, k),
            centroids,
            d,
            k,
        }
    }

    /// The values of points `range` of `source`, in order, into `out`
    /// (`range.len()` long). Prefetches the points after `range` for the last
    /// block.
    pub(crate) fn values(
        &self,
        source: Rows,
        range: Range<usize>,
        scratch: &mut Scratch,
        out: &mut [Raw],
    ) {
        assert_eq!(out.len(), range.len());
        let (d, k) = (self.d, self.k);
        // SAFETY: `available()` holds (asserted in `new`).
        unsafe {
            run_tile(
                &self.prep,
                source,
                range,
                d,
                self.centroids,
                k,
                false,
                scratch,
                |i, near, norm| out[i] = Raw { near, norm },
            )
        }
    }
}

/// Points `range` of `source` through the kernel, block by block. `sink(i, near,
/// norm)` receives the result of point `range.start + i`: with `refine`, the final one ([`refine_avx`]
/// and [`finish`] applied); without, its kernel values and shifted squared norm,
/// or (norm not below [`NORM_LIMIT`], then given as +inf) its final direct result.
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn run_tile(
    prep: &Prepared,
    source: Rows,
    range: Range<usize>,
    d: usize,
    centroids: &[f32],
    k: usize,
    refine: bool,
    scratch: &mut Scratch,
    mut sink: impl FnMut(usize, Nearest, f32),
) {
    let (first, m, total) = (range.start, range.len(), source.len(d));
    assert!(range.end <= total);
    let row = |i: usize| source.get(first + i, d);
    if prep.direct_only {
        for i in 0..m {
            sink(i, nearest_direct(row(i), centroids, d, k), f32::INFINITY);
        }
        return;
    }
    for b0 in (0..m).step_by(BP) {
        let rows = (m - b0).min(BP);
        // The next block's rows, past `range` too for the last block.
        let next = (first + b0 + BP).min(total)..(first + b0 + 2 * BP).min(total);
        transpose_shifted(
            |i| row(b0 + i),
            rows,
            d,
            &prep.shifted.shift,
            &mut scratch.xt,
        );
        block_norms(&scratch.xt, d, &mut scratch.norms);
        let next = match source {
            Rows::Block(b) => Next::Block(&b[next.start * d..next.end * d]),
            Rows::Picked { .. } => {
                cache_lines(next.map(|r| source.get(r, d)), &mut scratch.lines);
                Next::Lines(&scratch.lines)
            }
        };
        let near = block_kernel(&scratch.xt, &scratch.norms, &prep.packed, d, &next);
        for (r, near) in near.iter().enumerate().take(rows) {
            let (x, norm) = (row(b0 + r), scratch.norms[r]);
            if norm >= NORM_LIMIT {
                sink(b0 + r, nearest_direct(x, centroids, d, k), f32::INFINITY);
            } else if refine {
                let mut s = *near;
                refine_avx(&mut s, x, centroids, d);
                sink(b0 + r, finish(s, k), norm);
            } else {
                sink(b0 + r, *near, norm);
            }
        }
    }
}

/// The next block's rows, to be prefetched while a block computes.
enum Next<'a> {
    /// Consecutive rows: every cache line of this slice.
    Block(&'a [f32]),
    /// Scattered rows: the address of each of their cache lines.
    Lines(&'a [usize]),
}

impl Next<'_> {
    fn lines(&self) -> usize {
        match self {
            Next::Block([]) => 0,
            // One more line when the slice does not start on a line.
            Next::Block(b) => (b.len() * 4).div_ceil(64) + 1,
            Next::Lines(l) => l.len(),
        }
    }

    /// An address in the `i`-th line (`i < lines()`).
    #[inline(always)]
    fn addr(&self, i: usize) -> *const i8 {
        match self {
            Next::Block(b) => b[(i * 16).min(b.len() - 1)..].as_ptr().cast(),
            Next::Lines(l) => l[i] as *const i8,
        }
    }
}

/// Sets `lines` to the address of every cache line of `rows`.
fn cache_lines<'a>(rows: impl Iterator<Item = &'a [f32]>, lines: &mut Vec<usize>) {
    lines.clear();
    for row in rows {
        let Some(last) = row.last() else { continue };
        let (start, end) = (row.as_ptr() as usize, std::ptr::from_ref(last) as usize);
        // The row's first line, unless the previous row ended in it.
        if lines.last().is_none_or(|&l| l & !63 != start & !63) {
            lines.push(start);
        }
        let mut line = (start & !63) + 64;
        while line <= end {
            lines.push(line);
            line += 64;
        }
    }
}

/// Where the points of a pass come from.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    /// Consecutive rows of `d` features.
    Block(&'a [f32]),
    /// The given rows of `points`.
    Picked { points: &'a [f32], rows: &'a [u32] },
}

impl<'a> Rows<'a> {
    fn len(self, d: usize) -> usize {
        match self {
            Rows::Block(b) => b.len() / d,
            Rows::Picked { rows, .. } => rows.len(),
        }
    }

    #[inline(always)]
    pub(crate) fn get(self, i: usize, d: usize) -> &'a [f32] {
        match self {
            Rows::Block(b) => &b[i * d..(i + 1) * d],
            Rows::Picked { points, rows } => {
                let r = rows[i] as usize;
                &points[r * d..(r + 1) * d]
            }
        }
    }
}

/// The first `w` lanes (`w <= 16`).
#[inline]
fn lanes(w: usize) -> __mmask16 {
    if w >= 16 {
        !0
    } else {
        ((1u32 << w) - 1) as __mmask16
    }
}

/// Writes rows `row(0..rows)` (`rows <= BP`, `d` features each) minus `shift` to
/// `xt` feature-major (`xt[f * BP + r]`), zeros in the lanes of missing rows.
#[target_feature(enable = "avx512f,avx2,fma")]
fn transpose_shifted<'a>(
    row: impl Fn(usize) -> &'a [f32],
    rows: usize,
    d: usize,
    shift: &[f32],
    xt: &mut [f32],
) {
    assert!(rows <= BP && shift.len() == d && xt.len() == d * BP);
    let zero = _mm512_setzero_ps();
    let out = xt.as_mut_ptr();
    for half in 0..BP / 16 {
        let first = half * 16;
        let count = rows.saturating_sub(first).min(16);
        let mut here: [&[f32]; 16] = [&[]; 16];
        for (i, x) in here.iter_mut().enumerate().take(count) {
            *x = row(first + i);
            assert_eq!(x.len(), d);
        }
        let here = &here[..count];
        for f0 in (0..d).step_by(16) {
            let w = (d - f0).min(16);
            let mask = lanes(w);
            // SAFETY: the masked loads read lanes `l < w`, i.e. features `f0 + l <
            // d` of `shift` and of the rows (each asserted `d` long); masked-out
            // lanes are not read.
            let s = unsafe { _mm512_maskz_loadu_ps(mask, shift.as_ptr().add(f0)) };
            let dst = |f: usize| {
                // SAFETY: `(f0 + f) * BP + first + 16 <= d * BP = xt.len()` for
                // `f0 + f < d` (as `first + 16 <= BP`).
                unsafe { out.add((f0 + f) * BP + first) }
            };
            if count == 16 && w == 16 {
                // The common case, with every index known, so that the 16 rows
                // stay in registers.
                let r: [__m512; 16] = std::array::from_fn(|i| {
                    // SAFETY: as above, all 16 lanes being features `< d`.
                    _mm512_sub_ps(unsafe { _mm512_loadu_ps(here[i].as_ptr().add(f0)) }, s)
                });
                for (f, v) in transpose16(r).into_iter().enumerate() {
                    // SAFETY: `f < 16 = w`, see `dst`.
                    unsafe { _mm512_storeu_ps(dst(f), v) };
                }
                continue;
            }
            let mut r = [zero; 16];
            for (v, x) in r.iter_mut().zip(here) {
                // SAFETY: as above.
                let x = unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr().add(f0)) };
                *v = _mm512_sub_ps(x, s);
            }
            for (f, v) in transpose16(r).into_iter().enumerate().take(w) {
                // SAFETY: `f < w`, see `dst`.
                unsafe { _mm512_storeu_ps(dst(f), v) };
            }
        }
    }
}

/// The transpose of a 16 x 16 matrix held as 16 rows.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // Pairs of rows interleaved, then pairs of pairs: afterwards `u[4i + m]` holds,
    // in its 128-bit lane L, rows 4i..4i+4 at column 4L + m.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let [a, b, c, e] =
            [t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]].map(|v| _mm512_castps_pd(v));
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
    }
    // Then a 4 x 4 transpose of 128-bit lanes across u[m], u[4+m], u[8+m], u[12+m]:
    // column 4L + m gathers lane L of each.
    let mut out = [_mm512_setzero_ps(); 16];
    for m in 0..4 {
        let (a, b, c, e) = (u[m], u[4 + m], u[8 + m], u[12 + m]);
        let ab_lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
        let ab_hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
        let ce_lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(c, e);
        let ce_hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(c, e);
        out[m] = _mm512_shuffle_f32x4::<0b10_00_10_00>(ab_lo, ce_lo);
        out[4 + m] = _mm512_shuffle_f32x4::<0b11_01_11_01>(ab_lo, ce_lo);
        out[8 + m] = _mm512_shuffle_f32x4::<0b10_00_10_00>(ab_hi, ce_hi);
        out[12 + m] = _mm512_shuffle_f32x4::<0b11_01_11_01>(ab_hi, ce_hi);
    }
    out
}

/// Squared norms of the block's points: [`super::lane_sq_norm`] bit for bit, down
/// the lanes (feature `f` goes to accumulator `f % 8`, multiply then add, then
/// the same tree).
#[target_feature(enable = "avx512f")]
fn block_norms(xt: &[f32], d: usize, norms: &mut [f32; BP]) {
    assert_eq!(xt.len(), d * BP);
    let zero = _mm512_setzero_ps();
    let load = |f: usize, h: usize| {
        // SAFETY: `f < d` and `h < BP / 16`, so the 16 floats at `f * BP + 16 h`
        // are within `xt` (asserted `d * BP` long).
        unsafe { _mm512_loadu_ps(xt.as_ptr().add(f * BP + 16 * h)) }
    };
    for h in 0..BP / 16 {
        let mut acc = [zero; 8];
        let full = d / 8 * 8;
        for f0 in (0..full).step_by(8) {
            for (l, a) in acc.iter_mut().enumerate() {
                let v = load(f0 + l, h);
                *a = _mm512_add_ps(*a, _mm512_mul_ps(v, v));
            }
        }
        for (l, a) in acc.iter_mut().enumerate().take(d - full) {
            let v = load(full + l, h);
            *a = _mm512_add_ps(*a, _mm512_mul_ps(v, v));
        }
        let add = _mm512_add_ps;
        let sum = add(
            add(add(acc[0], acc[4]), add(acc[2], acc[6])),
            add(add(acc[1], acc[5]), add(acc[3], acc[7])),
        );
        // SAFETY: `norms` holds BP = 32 floats and `16 h + 16 <= 32`.
        unsafe { _mm512_storeu_ps(norms.as_mut_ptr().add(16 * h), sum) };
    }
}

/// Running best and second best of 16 lanes: `(best, best index, second, second
/// index)`.
type State = (__m512, __m512i, __m512, __m512i);

/// Offers centroid `idx` at distances `dist` to every lane. Strict comparisons:
/// on a tie the centroid seen first, the lower index, stays.
#[target_feature(enable = "avx512f")]
#[inline]
fn update(st: &mut State, dist: __m512, idx: __m512i) {
    let (best, best_idx, second, second_idx) = *st;
    let lt_best = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(dist, best);
    let lt_second = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(dist, second);
    let s = _mm512_mask_blend_ps(lt_second, second, dist);
    let si = _mm512_mask_blend_epi32(lt_second, second_idx, idx);
    *st = (
        _mm512_mask_blend_ps(lt_best, best, dist),
        _mm512_mask_blend_epi32(lt_best, best_idx, idx),
        _mm512_mask_blend_ps(lt_best, s, best),
        _mm512_mask_blend_epi32(lt_best, si, best_idx),
    );
}

/// Best and second best kernel values of the block's points (`xt`, `d x BP`,
/// with squared norms `x_norms`) among all centroids. Issues `prefetch`
/// meanwhile, spread over the feature steps.
#[target_feature(enable = "avx512f")]
fn block_kernel(
    xt: &[f32],
    x_norms: &[f32; BP],
    packed: &Packed,
    d: usize,
    prefetch: &Next,
) -> [Nearest; BP] {
    assert!(xt.len() == d * BP && packed.values.len() == packed.groups * d * C);
    assert_eq!(packed.norms.len(), packed.groups * C);
    let zero = _mm512_setzero_ps();
    let inf = _mm512_set1_ps(f32::INFINITY);
    let none = _mm512_set1_epi32(NO_SECOND as i32);
    let mut st = [(inf, none, inf, none); 2];
    // SAFETY: `x_norms` holds 32 floats.
    let xn = unsafe {
        [
            _mm512_loadu_ps(x_norms.as_ptr()),
            _mm512_loadu_ps(x_norms.as_ptr().add(16)),
        ]
    };

    // One batch of `per_step` lines every `step` feature steps.
    let lines = prefetch.lines();
    let mut next = 0usize;
    let steps = packed.groups * d;
    let step = steps.checked_div(lines).map_or(usize::MAX, |s| s.max(1));
    let per_step = if lines == 0 { 0 } else { lines.div_ceil(steps) };
    let mut count = 0usize;

    let xp = xt.as_ptr();
    for g in 0..packed.groups {
        let mut a0 = [zero; C];
        let mut a1 = [zero; C];
        // SAFETY: group `g < groups` spans `values[g*d*C .. (g+1)*d*C]` (length
        // asserted above); every read below is at `cg + f*C + j` with `f < d`,
        // `j < C`. The point loads read 16 floats at `f*BP` and `f*BP + 16`,
        // `f < d`, within `xt` (asserted `d * BP` long).
        unsafe {
            let cg = packed.values.as_ptr().add(g * d * C);
            for f in 0..d {
                count += 1;
                if count >= step {
                    count = 0;
                    for i in next..(next + per_step).min(lines) {
                        // A prefetch is only a hint: it cannot fault (and the
                        // address is one of a row of the next block anyway).
                        _mm_prefetch::<_MM_HINT_T0>(prefetch.addr(i));
                    }
                    next += per_step;
                }
                let x0 = _mm512_loadu_ps(xp.add(f * BP));
                let x1 = _mm512_loadu_ps(xp.add(f * BP + 16));
                for j in 0..C {
                    let c = _mm512_set1_ps(*cg.add(f * C + j));
                    a0[j] = _mm512_fmadd_ps(x0, c, a0[j]);
                    a1[j] = _mm512_fmadd_ps(x1, c, a1[j]);
                }
            }
        }
        for j in 0..C {
            let c = g * C + j;
            let cn = _mm512_set1_ps(packed.norms[c]);
            let idx = _mm512_set1_epi32(c as i32);
            // (‖x‖² − 2x·c) + ‖c‖², clamped at 0 (max returns its second operand
            // on NaN, so a NaN stays NaN and never wins).
            for (h, acc) in [a0[j], a1[j]].into_iter().enumerate() {
                let dist = _mm512_max_ps(zero, _mm512_add_ps(_mm512_add_ps(xn[h], acc), cn));
                update(&mut st[h], dist, idx);
            }
        }
    }

    let mut best = [0.0f32; BP];
    let mut best_idx = [0u32; BP];
    let mut second = [0.0f32; BP];
    let mut second_idx = [0u32; BP];
    for (h, s) in st.iter().enumerate() {
        // SAFETY: each array holds 32 elements of 4 bytes; `16 h + 16 <= 32`.
        unsafe {
            _mm512_storeu_ps(best.as_mut_ptr().add(16 * h), s.0);
            _mm512_storeu_si512(best_idx.as_mut_ptr().add(16 * h).cast(), s.1);
            _mm512_storeu_ps(second.as_mut_ptr().add(16 * h), s.2);
            _mm512_storeu_si512(second_idx.as_mut_ptr().add(16 * h).cast(), s.3);
        }
    }
    let mut near = [EMPTY; BP];
    for (i, n) in near.iter_mut().enumerate() {
        *n = Nearest {
            best: best_idx[i],
            best_dist: best[i],
            second: second_idx[i],
            second_dist: second[i],
        };
    }
    near
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::assign::tests::Rng;

    fn bits(n: &Nearest) -> (u32, u32, u32, u32) {
        (
            n.best,
            n.best_dist.to_bits(),
            n.second,
            n.second_dist.to_bits(),
        )
    }

    #[test]
    fn gives_the_avx2_kernels_results_bit_for_bit() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let mut rng = Rng(41);
        // Block and tile edges (n), features around the 16-wide transposes and the
        // 8-wide norm tree (d), groups of 8 centroids with padding (k).
        for &n in &[1, 31, 32, 33, 511, 512, 513, 1100] {
            for &d in &[17, 24, 31, 32, 35, 64, 100] {
                for &k in &[1, 2, 7, 8, 9, 64, 130] {
                    let points: Vec<f32> =
                        rng.values(n * d).iter().map(|v| 3.0 * v + 0.5).collect();
                    let centroids = rng.values(k * d);
                    let mut want = vec![Nearest::default(); n];
                    super::super::assign::fused::assign(&points, d, &centroids, k, &mut want);
                    let mut got = vec![Nearest::default(); n];
                    assign(&points, d, &centroids, k, &mut got);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            bits(g),
                            bits(w),
                            "n={n} d={d} k={k} point {i}: {g:?} vs {w:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn transpose16_transposes() {
        if !available() {
            return;
        }
        let m: Vec<f32> = (0..256).map(|v| v as f32).collect();
        // SAFETY: `available()` holds; each load reads 16 of the 256 floats.
        let t = unsafe {
            let rows: [__m512; 16] =
                std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(16 * i)));
            transpose16(rows)
        };
        for (c, v) in t.iter().enumerate() {
            let mut col = [0.0f32; 16];
            // SAFETY: `col` holds 16 floats.
            unsafe { _mm512_storeu_ps(col.as_mut_ptr(), *v) };
            let want: Vec<f32> = (0..16).map(|r| (16 * r + c) as f32).collect();
            assert_eq!(col.to_vec(), want, "column {c}");
        }
    }
}
