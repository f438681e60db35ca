//! The CG's vector kernels in AVX-512, for CPUs that have it and factor counts up
//! to [`MAX_D`]: a row of `d` values is `W = ⌈d / 16⌉` registers (the last one
//! masked), so the vector of a CG row and its output stay in registers while its
//! item rows stream by.
//!
//! - [`sparse_terms`] takes the item rows four at a time (for `d ≤ 64`; one at a
//!   time above, where four rows no longer fit the registers): their dot products
//!   with `v`, one transposed reduction for the four, the coefficients as one
//!   vector, then the four updates of the output, in item order. The rows are
//!   prefetched [`PREFETCH_GROUPS`] groups ahead: read straight from `y`, they are
//!   scattered.
//! - Every dot product, in [`dot`], [`dots`] and [`sparse_terms`], sums the same
//!   way: lane-wise products over the registers in two chains (even and odd
//!   registers), the chains added, then the [`reduce4`] tree. A row's value does
//!   not depend on the rows it is grouped with.
//! - [`block_times_a`] holds four rows of the output in registers (two above
//!   `d = 64`) while the rows of `A` stream by, `Σ_k block[k] a[k]` in `k` order,
//!   then times `alpha`.

use std::arch::x86_64::*;

/// The widest row these kernels take (eight registers).
pub(super) const MAX_D: usize = 128;
/// How many groups of item rows ahead [`sparse_terms`] asks for its rows.
const PREFETCH_GROUPS: usize = 4;

/// The mask of the last register of a `d`-value row.
#[inline(always)]
fn tail_mask(d: usize) -> __mmask16 {
    match d % 16 {
        0 => 0xffff,
        r => ((1u32 << r) - 1) as __mmask16,
    }
}

/// The `W` registers of the row at `p` (its last register masked by `tail`).
///
/// # Safety
/// `p` points to at least `16 (W − 1) + popcount(tail)` readable floats.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load<const W: usize>(p: *const f32, tail: __mmask16) -> [__m512; W] {
    // (No closures here or below: they would not be inlined into these
    // functions' instruction set.)
    let mut v = [_mm512_setzero_ps(); W];
    for (j, x) in v.iter_mut().enumerate() {
        // SAFETY: registers before the last read 16 floats each inside the row;
        // the last reads only its masked lanes (the others are neither read nor
        // faulted).
        *x = unsafe {
            if j + 1 == W {
                _mm512_maskz_loadu_ps(tail, p.add(16 * j))
            } else {
                _mm512_loadu_ps(p.add(16 * j))
            }
        };
    }
    v
}

/// Writes the `W` registers to the row at `p` (the last one masked by `tail`).
///
/// # Safety
/// As [`load`], for writing.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store<const W: usize>(p: *mut f32, tail: __mmask16, v: &[__m512; W]) {
    for (j, x) in v.iter().enumerate() {
        // SAFETY: as in `load`.
        unsafe {
            if j + 1 == W {
                _mm512_mask_storeu_ps(p.add(16 * j), tail, *x);
            } else {
                _mm512_storeu_ps(p.add(16 * j), *x);
            }
        }
    }
}

/// The lane-wise products of `r` and `v` summed over the registers: even
/// registers in one chain, odd ones in another, then the two added.
#[target_feature(enable = "avx512f")]
#[inline]
fn products<const W: usize>(r: &[__m512; W], v: &[__m512; W]) -> __m512 {
    let mut even = _mm512_mul_ps(r[0], v[0]);
    if W == 1 {
        return even;
    }
    let mut odd = _mm512_mul_ps(r[1], v[1]);
    let mut j = 2;
    while j < W {
        even = _mm512_fmadd_ps(r[j], v[j], even);
        if j + 1 < W {
            odd = _mm512_fmadd_ps(r[j + 1], v[j + 1], odd);
        }
        j += 2;
    }
    _mm512_add_ps(even, odd)
}

/// The totals of four registers: lanes `4g..4g + 4` of the result all hold the
/// sum of the 16 lanes of `s[g]` (quarters 0 + 2 and 1 + 3, then those two, then
/// within the quarter lanes 0 + 1 and 2 + 3, then those two).
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce4(s: [__m512; 4]) -> __m512 {
    let ab = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x44>(s[0], s[1]),
        _mm512_shuffle_f32x4::<0xEE>(s[0], s[1]),
    );
    let cd = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x44>(s[2], s[3]),
        _mm512_shuffle_f32x4::<0xEE>(s[2], s[3]),
    );
    let q = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(ab, cd),
        _mm512_shuffle_f32x4::<0xDD>(ab, cd),
    );
    let q = _mm512_add_ps(q, _mm512_permute_ps::<0b10_11_00_01>(q));
    _mm512_add_ps(q, _mm512_permute_ps::<0b01_00_11_10>(q))
}

/// Lane 0 of `x`.
#[target_feature(enable = "avx512f")]
#[inline]
fn first(x: __m512) -> f32 {
    _mm_cvtss_f32(_mm512_castps512_ps128(x))
}

/// Calls `$f::<W, ..>` for the `W` of `d`: `narrow` for `d` up to 64 (W 1..=4),
/// `wide` above (W 5..=8), `any` for either.
macro_rules! by_width {
    (narrow, $d:expr, $f:ident $(:: <$($g:tt),*>)? ($($arg:expr),* $(,)?)) => {
        match $d.div_ceil(16) {
            1 => $f::<1 $($(, $g)*)?>($($arg),*),
            2 => $f::<2 $($(, $g)*)?>($($arg),*),
            3 => $f::<3 $($(, $g)*)?>($($arg),*),
            4 => $f::<4 $($(, $g)*)?>($($arg),*),
            _ => unreachable!("d = {} is not narrow", $d),
        }
    };
    (wide, $d:expr, $f:ident $(:: <$($g:tt),*>)? ($($arg:expr),* $(,)?)) => {
        match $d.div_ceil(16) {
            5 => $f::<5 $($(, $g)*)?>($($arg),*),
            6 => $f::<6 $($(, $g)*)?>($($arg),*),
            7 => $f::<7 $($(, $g)*)?>($($arg),*),
            8 => $f::<8 $($(, $g)*)?>($($arg),*),
            _ => panic!("d = {} is over the {MAX_D} of the AVX-512 kernels", $d),
        }
    };
    (any, $d:expr, $($call:tt)*) => {
        if $d <= 64 { by_width!(narrow, $d, $($call)*) } else { by_width!(wide, $d, $($call)*) }
    };
}

/// `x · y` (both of the same length, at most [`MAX_D`]).
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(super) fn dot(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len(), "dot of vectors of two lengths");
    by_width!(any, x.len(), dot_w(x, y))
}

#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
fn dot_w<const W: usize>(x: &[f32], y: &[f32]) -> f32 {
    assert!(W == x.len().div_ceil(16) && x.len() == y.len());
    let tail = tail_mask(x.len());
    // SAFETY: both have x.len() = 16 (W − 1) + popcount(tail) values.
    let (a, b) = unsafe { (load::<W>(x.as_ptr(), tail), load::<W>(y.as_ptr(), tail)) };
    let z = _mm512_setzero_ps();
    first(reduce4([products(&a, &b), z, z, z]))
}

/// `out[k] = row(k) · v` for every `k < out.len()`; every row has `v.len()`
/// values (at most [`MAX_D`]).
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(super) fn dots<'a>(row: impl Fn(usize) -> &'a [f32], v: &[f32], out: &mut [f32]) {
    by_width!(any, v.len(), dots_w(&row, v, out))
}

#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
fn dots_w<'a, const W: usize>(row: &impl Fn(usize) -> &'a [f32], v: &[f32], out: &mut [f32]) {
    let d = v.len();
    assert_eq!(W, d.div_ceil(16));
    let tail = tail_mask(d);
    // SAFETY: v has d values.
    let vv = unsafe { load::<W>(v.as_ptr(), tail) };
    let mut k = 0;
    while k < out.len() {
        let g = 4.min(out.len() - k);
        let mut s = [_mm512_setzero_ps(); 4];
        for (t, st) in s.iter_mut().enumerate().take(g) {
            let r = row(k + t);
            assert_eq!(r.len(), d, "rows of another length than v");
            // SAFETY: r has d values (asserted).
            *st = products(&unsafe { load::<W>(r.as_ptr(), tail) }, &vv);
        }
        let mut totals = [0.0f32; 16];
        // SAFETY: `totals` holds 16 floats.
        unsafe { _mm512_storeu_ps(totals.as_mut_ptr(), reduce4(s)) };
        for t in 0..g {
            out[k + t] = totals[4 * t];
        }
        k += g;
    }
}

/// `out += Σ_k coef_k row(k)` with `coef_k = c_k − (c_k − 1)(row(k) · v)` for
/// the residual (`RESIDUAL`), `(c_k − 1)(row(k) · v)` for the product with `v`;
/// the terms added in `k` order. Every row, `v` and `out` have the same length
/// (at most [`MAX_D`]).
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(super) fn sparse_terms<'a, const RESIDUAL: bool>(
    row: impl Fn(usize) -> &'a [f32],
    c: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    assert_eq!(v.len(), out.len(), "v and out differ in length");
    if v.len() <= 64 {
        by_width!(
            narrow,
            v.len(),
            sparse_terms_w::<4, RESIDUAL>(&row, c, v, out)
        )
    } else {
        by_width!(
            wide,
            v.len(),
            sparse_terms_w::<1, RESIDUAL>(&row, c, v, out)
        )
    }
}

/// [`sparse_terms`] with `W` registers per row, in groups of `G` rows (then the
/// rest one by one).
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
fn sparse_terms_w<'a, const W: usize, const G: usize, const RESIDUAL: bool>(
    row: &impl Fn(usize) -> &'a [f32],
    c: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    let d = v.len();
    let n = c.len();
    assert!(W == d.div_ceil(16) && out.len() == d);
    let tail = tail_mask(d);
    // SAFETY: v has d values.
    let vv = unsafe { load::<W>(v.as_ptr(), tail) };
    // SAFETY: out has d values.
    let mut acc = unsafe { load::<W>(out.as_ptr(), tail) };
    let mut k = 0;
    while k + G <= n {
        if k + (PREFETCH_GROUPS + 1) * G <= n {
            for t in 0..G {
                super::als::prefetch_row(row(k + PREFETCH_GROUPS * G + t));
            }
        }
        let mut rows: [&[f32]; G] = [&[]; G];
        for (t, r) in rows.iter_mut().enumerate() {
            *r = row(k + t);
            assert_eq!(r.len(), d, "rows of another length than v");
        }
        // SAFETY: every row has d = 16 (W − 1) + popcount(tail) values.
        unsafe { group::<W, G, RESIDUAL>(rows, &c[k..k + G], &vv, &mut acc, tail) };
        k += G;
    }
    while k < n {
        let r = row(k);
        assert_eq!(r.len(), d, "rows of another length than v");
        // SAFETY: as above.
        unsafe { group::<W, 1, RESIDUAL>([r], &c[k..k + 1], &vv, &mut acc, tail) };
        k += 1;
    }
    // SAFETY: out has d values.
    unsafe { store::<W>(out.as_mut_ptr(), tail, &acc) };
}

/// The terms of `G ≤ 4` rows with confidences `c` (`G` of them), added to `acc`
/// in row order.
///
/// # Safety
/// Every row has `16 (W − 1) + popcount(tail)` values.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn group<const W: usize, const G: usize, const RESIDUAL: bool>(
    rows: [&[f32]; G],
    c: &[f32],
    v: &[__m512; W],
    acc: &mut [__m512; W],
    tail: __mmask16,
) {
    let mut regs = [[_mm512_setzero_ps(); W]; G];
    let mut s = [_mm512_setzero_ps(); 4];
    for t in 0..G {
        // SAFETY: every row has the length `load` needs (the caller's promise).
        regs[t] = unsafe { load::<W>(rows[t].as_ptr(), tail) };
        s[t] = products(&regs[t], v);
    }
    let mut ck = [1.0f32; 4];
    ck[..G].copy_from_slice(c);
    // Lanes 4t..4t + 4 take the confidence of row t.
    let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    // SAFETY: `ck` holds 4 floats.
    let cv = _mm512_permutexvar_ps(
        spread,
        _mm512_castps128_ps512(unsafe { _mm_loadu_ps(ck.as_ptr()) }),
    );
    let scaled = _mm512_mul_ps(_mm512_sub_ps(cv, _mm512_set1_ps(1.0)), reduce4(s));
    let coef = if RESIDUAL {
        _mm512_sub_ps(cv, scaled)
    } else {
        scaled
    };
    for (t, r) in regs.iter().enumerate() {
        let b = match t {
            0 => _mm512_shuffle_f32x4::<0x00>(coef, coef),
            1 => _mm512_shuffle_f32x4::<0x55>(coef, coef),
            2 => _mm512_shuffle_f32x4::<0xAA>(coef, coef),
            _ => _mm512_shuffle_f32x4::<0xFF>(coef, coef),
        };
        for (a, x) in acc.iter_mut().zip(r) {
            *a = _mm512_fmadd_ps(b, *x, *a);
        }
    }
}

/// `out = alpha · (block · A)` (`block` and `out`: `m x d`, `a`: `d x d`, all
/// row-major, `d` at most [`MAX_D`]; sizes checked by the caller).
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub(super) fn block_times_a(alpha: f32, block: &[f32], a: &[f32], out: &mut [f32], d: usize) {
    if d <= 64 {
        by_width!(narrow, d, block_times_a_w::<4>(alpha, block, a, out, d))
    } else {
        by_width!(wide, d, block_times_a_w::<2>(alpha, block, a, out, d))
    }
}

/// [`block_times_a`] with `W` registers per row and `R` rows at a time (then the
/// rest one by one).
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
fn block_times_a_w<const W: usize, const R: usize>(
    alpha: f32,
    block: &[f32],
    a: &[f32],
    out: &mut [f32],
    d: usize,
) {
    let m = block.len() / d;
    let mut u = 0;
    while u + R <= m {
        rows_times_a::<W, R>(
            alpha,
            &block[u * d..(u + R) * d],
            a,
            &mut out[u * d..(u + R) * d],
            d,
        );
        u += R;
    }
    while u < m {
        rows_times_a::<W, 1>(
            alpha,
            &block[u * d..(u + 1) * d],
            a,
            &mut out[u * d..(u + 1) * d],
            d,
        );
        u += 1;
    }
}

/// `out = alpha · (rows · A)` for `R` rows held in registers.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
fn rows_times_a<const W: usize, const R: usize>(
    alpha: f32,
    rows: &[f32],
    a: &[f32],
    out: &mut [f32],
    d: usize,
) {
    assert!(W == d.div_ceil(16) && rows.len() == R * d && out.len() == R * d && a.len() == d * d);
    let tail = tail_mask(d);
    let mut acc = [[_mm512_setzero_ps(); W]; R];
    for k in 0..d {
        // SAFETY: row k of a has d values (a is d x d).
        let ak = unsafe { load::<W>(a.as_ptr().add(k * d), tail) };
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let b = _mm512_set1_ps(rows[r * d + k]);
            for (x, y) in acc_r.iter_mut().zip(&ak) {
                *x = _mm512_fmadd_ps(b, *y, *x);
            }
        }
    }
    let scale = _mm512_set1_ps(alpha);
    for (r, acc_r) in acc.iter().enumerate() {
        let mut scaled = *acc_r;
        for x in &mut scaled {
            *x = _mm512_mul_ps(scale, *x);
        }
        // SAFETY: row r of out has d values (asserted).
        unsafe { store::<W>(out.as_mut_ptr().add(r * d), tail, &scaled) };
    }
}
