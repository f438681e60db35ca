//! The CG's vector kernels in AVX2 + FMA, for CPUs that have them (the AVX-512
//! ones are in `als_avx512`; [`super::als`] picks the set the CPU runs).

use std::arch::x86_64::*;

/// `x · y` over the shorter length: two 8-lane accumulators over blocks of
/// 16, one more block of 8 into the first, the lanes summed in a fixed order,
/// then the last `len % 8` terms one by one.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn dot(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let (xp, yp) = (x.as_ptr(), y.as_ptr());
    let mut a0 = _mm256_setzero_ps();
    let mut a1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (every load below): it reads 8 floats from i, with i + 8 <= n,
    // and n is at most the length of both slices.
    while i + 16 <= n {
        unsafe {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(yp.add(i)), a0);
            a1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(xp.add(i + 8)),
                _mm256_loadu_ps(yp.add(i + 8)),
                a1,
            );
        }
        i += 16;
    }
    if i + 8 <= n {
        unsafe {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(yp.add(i)), a0);
        }
        i += 8;
    }
    let v = _mm256_add_ps(a0, a1);
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
    let mut s = _mm_cvtss_f32(h);
    while i < n {
        s = x[i].mul_add(y[i], s);
        i += 1;
    }
    s
}

/// `out[k] = row(k) · v`, four rows at a time: two 8-lane accumulators per
/// row over blocks of 16 features (one more block of 8 into the first), the
/// four rows' lanes summed together by horizontal adds, then each row's last
/// `d % 8` terms one by one. Left-over rows (fewer than four) go through
/// [`dot`]. Every row of `row` must have `v.len()` values.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn dots<'a>(row: impl Fn(usize) -> &'a [f32], v: &[f32], out: &mut [f32]) {
    let d = v.len();
    let vp = v.as_ptr();
    let groups = out.len() / 4;
    for g in 0..groups {
        let r = [row(4 * g), row(4 * g + 1), row(4 * g + 2), row(4 * g + 3)];
        assert!(
            r.iter().all(|x| x.len() == d),
            "rows of another length than v"
        );
        let p = r.map(|x| x.as_ptr());
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY (every load below): 8 floats from i with i + 8 <= d, the
        // length of v and of each row (asserted above).
        while i + 16 <= d {
            let (va, vb) = unsafe { (_mm256_loadu_ps(vp.add(i)), _mm256_loadu_ps(vp.add(i + 8))) };
            for j in 0..4 {
                unsafe {
                    lo[j] = _mm256_fmadd_ps(_mm256_loadu_ps(p[j].add(i)), va, lo[j]);
                    hi[j] = _mm256_fmadd_ps(_mm256_loadu_ps(p[j].add(i + 8)), vb, hi[j]);
                }
            }
            i += 16;
        }
        if i + 8 <= d {
            let va = unsafe { _mm256_loadu_ps(vp.add(i)) };
            for j in 0..4 {
                lo[j] = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(p[j].add(i)) }, va, lo[j]);
            }
            i += 8;
        }
        let a = [0, 1, 2, 3].map(|j| _mm256_add_ps(lo[j], hi[j]));
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let mut s = [0.0f32; 4];
        // SAFETY: `s` holds 4 floats.
        unsafe { _mm_storeu_ps(s.as_mut_ptr(), sums) };
        for (j, sj) in s.iter_mut().enumerate() {
            for t in i..d {
                *sj = r[j][t].mul_add(v[t], *sj);
            }
        }
        out[4 * g..4 * g + 4].copy_from_slice(&s);
    }
    for (k, o) in out.iter_mut().enumerate().skip(4 * groups) {
        *o = dot(row(k), v);
    }
}

/// `out = alpha · (block · A)` (`block` and `out`: `m x d`, `a`: `d x d`, all
/// row-major; sizes checked by the caller): for each row, `Σ_k block[k] a[k]`
/// in `k` order with one rounding per step, columns in blocks of 32 (then 8)
/// held in registers, rows two at a time sharing the loads of `a`, the last
/// `d % 8` columns one by one; then times `alpha`. A row's values do not
/// depend on the rows next to it.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn block_times_a(alpha: f32, block: &[f32], a: &[f32], out: &mut [f32], d: usize) {
    let m = block.len() / d;
    assert_eq!(a.len(), d * d, "a is not d x d");
    let ap = a.as_ptr();
    let scale = _mm256_set1_ps(alpha);
    let mut u = 0;
    while u < m {
        // two rows, or the last one alone (then `u1` repeats it, unwritten)
        let pair = u + 1 < m;
        let (x0, x1) = (
            &block[u * d..(u + 1) * d],
            &block[if pair { u + 1 } else { u } * d..][..d],
        );
        let mut c = 0;
        // SAFETY (every load below): 8 floats of row k of a from column
        // c + 8j with c + 8j + 8 <= d, inside a (d x d).
        while c + 32 <= d {
            let mut acc0 = [_mm256_setzero_ps(); 4];
            let mut acc1 = [_mm256_setzero_ps(); 4];
            for k in 0..d {
                let (b0, b1) = (_mm256_set1_ps(x0[k]), _mm256_set1_ps(x1[k]));
                for j in 0..4 {
                    let v = unsafe { _mm256_loadu_ps(ap.add(k * d + c + 8 * j)) };
                    acc0[j] = _mm256_fmadd_ps(b0, v, acc0[j]);
                    acc1[j] = _mm256_fmadd_ps(b1, v, acc1[j]);
                }
            }
            store_scaled(&mut out[u * d + c..u * d + c + 32], &acc0, scale);
            if pair {
                store_scaled(
                    &mut out[(u + 1) * d + c..(u + 1) * d + c + 32],
                    &acc1,
                    scale,
                );
            }
            c += 32;
        }
        while c + 8 <= d {
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for k in 0..d {
                let v = unsafe { _mm256_loadu_ps(ap.add(k * d + c)) };
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(x0[k]), v, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(x1[k]), v, acc1);
            }
            store_scaled(&mut out[u * d + c..u * d + c + 8], &[acc0], scale);
            if pair {
                store_scaled(
                    &mut out[(u + 1) * d + c..(u + 1) * d + c + 8],
                    &[acc1],
                    scale,
                );
            }
            c += 8;
        }
        for col in c..d {
            let (mut s0, mut s1) = (0.0f32, 0.0f32);
            for k in 0..d {
                s0 = x0[k].mul_add(a[k * d + col], s0);
                s1 = x1[k].mul_add(a[k * d + col], s1);
            }
            out[u * d + col] = alpha * s0;
            if pair {
                out[(u + 1) * d + col] = alpha * s1;
            }
        }
        u += if pair { 2 } else { 1 };
    }
}

/// `out[8j..8j + 8] = scale · acc[j]`; `out` holds `8 · acc.len()` floats.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn store_scaled(out: &mut [f32], acc: &[__m256], scale: __m256) {
    assert_eq!(out.len(), 8 * acc.len(), "out is not 8 floats per register");
    for (j, v) in acc.iter().enumerate() {
        // SAFETY: 8 floats from 8j, with 8j + 8 <= out.len() (asserted).
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * j), _mm256_mul_ps(scale, *v)) };
    }
}

/// `out += Σ_k coef[k] row(k)`: `out` in blocks of 32 (then 8) values held
/// in registers while every row is added in `k` order, the last `len % 8`
/// values one by one. Every row must have `out.len()` values.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn axpys<'a>(row: impl Fn(usize) -> &'a [f32], coef: &[f32], out: &mut [f32]) {
    let d = out.len();
    for k in 0..coef.len() {
        assert_eq!(row(k).len(), d, "rows of another length than out");
    }
    let op = out.as_mut_ptr();
    let mut i = 0;
    // SAFETY (every load and store below): 8 floats from i + 8m with
    // i + 8m + 8 <= d, the length of out and of every row (asserted above).
    while i + 32 <= d {
        let mut acc = [0, 8, 16, 24].map(|o| unsafe { _mm256_loadu_ps(op.add(i + o)) });
        for (k, &ck) in coef.iter().enumerate() {
            let c = _mm256_set1_ps(ck);
            let rp = row(k).as_ptr();
            for (m, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(c, unsafe { _mm256_loadu_ps(rp.add(i + 8 * m)) }, *a);
            }
        }
        for (m, a) in acc.iter().enumerate() {
            unsafe { _mm256_storeu_ps(op.add(i + 8 * m), *a) };
        }
        i += 32;
    }
    while i + 8 <= d {
        let mut a = unsafe { _mm256_loadu_ps(op.add(i)) };
        for (k, &ck) in coef.iter().enumerate() {
            let rp = row(k).as_ptr();
            a = _mm256_fmadd_ps(_mm256_set1_ps(ck), unsafe { _mm256_loadu_ps(rp.add(i)) }, a);
        }
        unsafe { _mm256_storeu_ps(op.add(i), a) };
        i += 8;
    }
    for (t, o) in out.iter_mut().enumerate().skip(i) {
        for (k, &ck) in coef.iter().enumerate() {
            *o = ck.mul_add(row(k)[t], *o);
        }
    }
}
