//! The CPU backend's ALS kernels, as free functions over host slices (the
//! [`crate::Backend`] impl in `cpu/mod.rs` unwraps the residents and calls these).
//!
//! - [`gram`] cuts the rows into fixed blocks of [`GRAM_BLOCK_ROWS`], computes each
//!   block's `BᵀB` with one `dgemm` on an f64 copy of the block (products of f32
//!   are exact in f64) in parallel, and adds the block results in block order. The
//!   blocks do not depend on the number of threads, so neither do the bits.
//! - [`als_solve`] runs the conjugate-gradient solver of the `implicit` library
//!   (`_solve_cg`) on blocks of rows in parallel: a block gathers its item rows
//!   once (from an item matrix too large for the cache), its `(YᵀY + λI)·p`
//!   products are one block product per CG step, the rest is done row by row.
//!   The vector kernels come in three sets ([`Isa`]), the fastest the CPU runs
//!   picked at run time: AVX-512 ([`avx512`], factor counts up to 128), AVX2 +
//!   FMA ([`avx2`]), or plain Rust (`sgemm` for the block products). A row only
//!   reads its own confidences, the item factors and `YᵀY + λI`, with the same
//!   arithmetic in any block, so its result depends on nothing else (but the
//!   kernel set: they round differently).

use rayon::prelude::*;

use crate::{CgParams, Csr, KernelError, check};

#[cfg(target_arch = "x86_64")]
use super::als_avx512 as avx512;

/// Rows per block of [`gram`]. A constant, so that the order in which the f64
/// block results are added does not depend on the number of threads.
pub(crate) const GRAM_BLOCK_ROWS: usize = 1024;
/// Upper bound on the memory held by block results of [`gram`] waiting to be added.
const GRAM_PARTIALS_BUDGET_BYTES: usize = 256 << 20;
/// CG stops once the squared norm of the residual is below this (as `implicit`).
const CG_TOLERANCE: f32 = 1e-20;

// ---------------------------------------------------------------------------
// Gram matrix.

/// `AᵀA` (`d x d`, row-major, exactly symmetric) of the row-major `a`.
pub(crate) fn gram(a: &[f32], d: usize) -> Vec<f64> {
    let n = a.len() / d;
    let blocks = n.div_ceil(GRAM_BLOCK_ROWS);
    // How many block results are computed before being added: only bounds the
    // memory, the additions follow the block order whatever this is.
    let batch = (rayon::current_num_threads() * 4)
        .min(GRAM_PARTIALS_BUDGET_BYTES / (d * d * 8))
        .max(1);

    let mut total = vec![0.0f64; d * d];
    let mut first = 0;
    while first < blocks {
        let last = (first + batch).min(blocks);
        let partials: Vec<Vec<f64>> = (first..last)
            .into_par_iter()
            .map_init(Vec::new, |wide, b| {
                let rows = b * GRAM_BLOCK_ROWS..((b + 1) * GRAM_BLOCK_ROWS).min(n);
                block_gram(&a[rows.start * d..rows.end * d], d, wide)
            })
            .collect();
        for p in &partials {
            for (t, v) in total.iter_mut().zip(p) {
                *t += *v;
            }
        }
        first = last;
    }
    // dgemm computes (i, j) and (j, i) separately; make the symmetry exact.
    for i in 0..d {
        for j in 0..i {
            total[i * d + j] = total[j * d + i];
        }
    }
    total
}

/// `BᵀB` of one block, through an f64 copy of it in `wide`.
fn block_gram(block: &[f32], d: usize, wide: &mut Vec<f64>) -> Vec<f64> {
    let m = block.len() / d;
    wide.clear();
    wide.extend(block.iter().map(|&v| f64::from(v)));
    let mut out = vec![0.0f64; d * d];
    // SAFETY: dgemm reads A = Bᵀ (d x m) from `wide` with strides (1, d): element
    // (i, k) is B[k][i] at k*d + i <= (m-1)*d + d-1 < wide.len() = m*d. It reads
    // B (m x d) from `wide` with strides (d, 1), same bound. It writes C = `out`
    // (d x d) with strides (d, 1): last element at d*d - 1 < out.len(). `out` is
    // a fresh allocation, so it aliases neither input; beta = 0, so its old
    // contents are never read.
    unsafe {
        matrixmultiply::dgemm(
            d,
            m,
            d,
            1.0,
            wide.as_ptr(),
            1,
            d as isize,
            wide.as_ptr(),
            d as isize,
            1,
            0.0,
            out.as_mut_ptr(),
            d as isize,
            1,
        );
    }
    out
}

// ---------------------------------------------------------------------------
// Implicit ALS with conjugate gradient.

/// The kernel sets of [`als_solve`]. A row's result depends on its own data and
/// on the set (they round differently), nothing else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Plain Rust, one rounding per operation.
    Portable,
    /// Fused multiply-adds: the [`avx2`] kernels on x86-64 (AVX2 + FMA), plain
    /// Rust with `mul_add` on aarch64.
    Fma,
    /// The [`avx512`] kernels (AVX-512F, AVX2 and FMA; rows of up to
    /// `avx512::MAX_D` values).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The kernel sets this CPU runs for rows of `d` values, the fastest last.
    pub(crate) fn available(d: usize) -> Vec<Isa> {
        let mut sets = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            sets.push(Isa::Fma);
            if is_x86_feature_detected!("avx512f") && d <= avx512::MAX_D {
                sets.push(Isa::Avx512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        sets.push(Isa::Fma);
        let _ = d;
        sets
    }

    /// The fastest of [`Isa::available`].
    pub(crate) fn best(d: usize) -> Isa {
        *Isa::available(d)
            .last()
            .expect("the portable set is always there")
    }
}

/// One implicit-ALS half-step over every row of the row-major `x` (`d` features
/// per row), with item factors `y`, Gram `yty` and confidences `confidence`
/// (`x` rows by `y` rows), with the kernels of `isa` (one of [`Isa::available`];
/// the backend passes [`Isa::best`]). See [`crate::Backend::als_solve`]; returns
/// the pair loss when `params.pair_loss` asks for it.
///
/// The rows are cut into blocks (see [`row_blocks`]) solved in parallel. A block
/// copies the item rows its rows refer to into one contiguous buffer once when
/// `y` is larger than the cache (so the CG steps read them from cache, not from
/// wherever they lie in `y`; see [`GATHER_MIN_Y_BYTES`]), and runs
/// `implicit`'s `_solve_cg` on all its rows in lockstep: each step's
/// `(YᵀY + λI)·p` products of the whole block are one block product, the sparse terms
/// and the vector updates are done row by row. A row's arithmetic is the same
/// whatever block it is in, so its result depends on nothing but its own data
/// (and `isa`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn als_solve(
    isa: Isa,
    x: &mut [f32],
    y: &[f32],
    d: usize,
    y_d: usize,
    yty: &[f64],
    confidence: &Csr,
    params: CgParams,
) -> Result<Option<f64>, KernelError> {
    assert!(
        Isa::available(d).contains(&isa),
        "{isa:?} kernels do not run here for d = {d}"
    );
    let (x_n, y_n) = (x.len() / d, y.len() / d);
    check::als(
        (x_n, d),
        (y_n, y_d),
        (confidence.rows, confidence.cols),
        yty,
        params.regularization,
    )?;
    // The values are finite (checked by `upload_sparse`).
    if let Some(pos) = first_below_one(&confidence.values) {
        let row = confidence.indptr.partition_point(|&o| o as usize <= pos) - 1;
        return Err(KernelError::Shape(format!(
            "confidence of row {row}, item {} is {}: implicit ALS needs confidences >= 1 \
             (1 + alpha * weight, with weights >= 0)",
            confidence.indices[pos], confidence.values[pos]
        )));
    }
    tracing::trace!(
        rows = x_n,
        items = y_n,
        d,
        nnz = confidence.values.len(),
        cg_steps = params.cg_steps,
        "implicit ALS half-step on the cpu backend"
    );
    if x_n == 0 {
        return Ok(params.pair_loss.then_some(0.0));
    }

    // Aᵀ with A = YᵀY + λI in f32, built once: the block products take the rows
    // of `a` as the columns of A (the same as A itself when YᵀY is symmetric, as
    // every Gram is).
    let lambda = params.regularization;
    let a: Vec<f32> = (0..d * d)
        .map(|pos| {
            let (i, j) = (pos / d, pos % d);
            let diag = if i == j { f64::from(lambda) } else { 0.0 };
            (yty[j * d + i] + diag) as f32
        })
        .collect();

    let blocks = row_blocks(&confidence.indptr, d);
    let mut slices = Vec::with_capacity(blocks.len());
    let mut rest = &mut x[..];
    for rows in &blocks {
        let (head, tail) = rest.split_at_mut(rows.len() * d);
        slices.push((rows.start, head));
        rest = tail;
    }
    let job = CgJob {
        isa,
        a: &a,
        y,
        d,
        confidence,
        cg_steps: params.cg_steps,
        pair_loss: params.pair_loss,
    };
    let losses: Vec<f64> = slices
        .into_par_iter()
        .map_init(
            || CgScratch::new(d),
            |scratch, (first, xb)| job.solve_block(first, xb, scratch),
        )
        .collect();
    // Block results added in block order: the same bits whatever the threads.
    Ok(params.pair_loss.then(|| losses.iter().sum()))
}

/// Position of the first value below 1, searched in parallel chunks.
fn first_below_one(values: &[f32]) -> Option<usize> {
    const CHUNK: usize = 1 << 16;
    let chunk = values
        .par_chunks(CHUNK)
        .position_first(|c| c.iter().any(|&v| v < 1.0))?;
    let start = chunk * CHUNK;
    values[start..]
        .iter()
        .position(|&v| v < 1.0)
        .map(|p| start + p)
}

/// Rows per block of [`als_solve`]: the height of its `(YᵀY + λI)·P` products.
const CG_BLOCK_ROWS: usize = 64;
/// Gathered item values per block of [`als_solve`] (256 KiB of f32): a block takes
/// rows until its gathered rows would pass this. A row that alone needs more is
/// solved by itself, reading the item rows where they are.
const CG_GATHER_BUDGET: usize = 1 << 16;

/// The blocks of [`als_solve`]: consecutive rows, at most [`CG_BLOCK_ROWS`] and
/// at most [`CG_GATHER_BUDGET`] gathered values each (a row over the budget is
/// alone in its block). They depend only on the CSR, not on the threads.
fn row_blocks(indptr: &[u64], d: usize) -> Vec<std::ops::Range<usize>> {
    let rows = indptr.len() - 1;
    let mut blocks = Vec::with_capacity(rows.div_ceil(CG_BLOCK_ROWS));
    let mut start = 0;
    let mut gathered = 0usize;
    for r in 0..rows {
        let need = (indptr[r + 1] - indptr[r]) as usize * d;
        if r > start && (r - start == CG_BLOCK_ROWS || gathered + need > CG_GATHER_BUDGET) {
            blocks.push(start..r);
            start = r;
            gathered = 0;
        }
        gathered += need;
    }
    blocks.push(start..rows);
    blocks
}

/// Per-thread buffers of [`als_solve`].
struct CgScratch {
    /// The gathered item rows of a block, row after row in CSR order.
    items: Vec<f32>,
    r: Vec<f32>,
    p: Vec<f32>,
    ap: Vec<f32>,
    rs_old: Vec<f32>,
    active: Vec<bool>,
}

impl CgScratch {
    fn new(d: usize) -> Self {
        let block = CG_BLOCK_ROWS * d;
        CgScratch {
            items: Vec::new(),
            r: vec![0.0; block],
            p: vec![0.0; block],
            ap: vec![0.0; block],
            rs_old: vec![0.0; CG_BLOCK_ROWS],
            active: vec![false; CG_BLOCK_ROWS],
        }
    }
}

/// What every block of one [`als_solve`] shares.
struct CgJob<'a> {
    isa: Isa,
    /// `YᵀY + λI`, `d x d` (symmetric).
    a: &'a [f32],
    y: &'a [f32],
    d: usize,
    confidence: &'a Csr,
    cg_steps: u32,
    pair_loss: bool,
}

impl CgJob<'_> {
    /// Solves the rows `first..` of `xb` (`xb.len() / d` rows) with the kernels
    /// of `self.isa` and returns their pair loss (0 unless asked for).
    fn solve_block(&self, first: usize, xb: &mut [f32], scratch: &mut CgScratch) -> f64 {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `als_solve` asserts that `isa` is one of `Isa::available(d)`,
            // which has `Isa::Avx512` only where the CPU runs AVX-512F, AVX2 and
            // FMA and d is at most `avx512::MAX_D`.
            Isa::Avx512 => unsafe { self.solve_block_avx512(first, xb, scratch) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above: `Isa::Fma` is available on x86-64 only where the
            // CPU runs AVX2 and FMA.
            Isa::Fma => unsafe { self.solve_block_fma(first, xb, scratch) },
            // SAFETY: off x86-64 the FMA path uses no x86 instructions (FMA is
            // part of the aarch64 base, the only other target choosing it).
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Fma => unsafe { self.solve_block_body::<true, false>(first, xb, scratch) },
            // SAFETY: without FMA the body uses no target-specific instructions.
            Isa::Portable => unsafe { self.solve_block_body::<false, false>(first, xb, scratch) },
        }
    }

    /// [`CgJob::solve_block_body`] compiled for AVX2 with fused multiply-adds.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn solve_block_fma(&self, first: usize, xb: &mut [f32], scratch: &mut CgScratch) -> f64 {
        // SAFETY: this function only runs on CPUs with AVX2 and FMA.
        unsafe { self.solve_block_body::<true, false>(first, xb, scratch) }
    }

    /// [`CgJob::solve_block_body`] with the [`avx512`] kernels.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn solve_block_avx512(&self, first: usize, xb: &mut [f32], scratch: &mut CgScratch) -> f64 {
        // SAFETY: this function only runs on CPUs with AVX-512F, AVX2 and FMA,
        // for d <= avx512::MAX_D.
        unsafe { self.solve_block_body::<true, true>(first, xb, scratch) }
    }

    /// `FMA`: whether `a * b + c` is computed with one rounding (the CPU has the
    /// instruction) or two. `WIDE`: the vector kernels are the [`avx512`] ones.
    ///
    /// # Safety
    /// With `FMA` on x86-64 the CPU must have AVX2 and FMA (the body then calls
    /// the [`avx2`] kernels); with `WIDE` also AVX-512F, and d must be at most
    /// `avx512::MAX_D`.
    #[inline(always)]
    unsafe fn solve_block_body<const FMA: bool, const WIDE: bool>(
        &self,
        first: usize,
        xb: &mut [f32],
        scratch: &mut CgScratch,
    ) -> f64 {
        let d = self.d;
        let m = xb.len() / d;
        let conf = self.confidence;
        let (lo, hi) = (conf.indptr[first] as usize, conf.indptr[first + m] as usize);
        // Rows of a `y` that stays in the cache are read where they are: the copy
        // would cost more than it saves.
        let gathered = self.y.len() * 4 > GATHER_MIN_Y_BYTES && (hi - lo) * d <= CG_GATHER_MAX;
        if gathered {
            let cols = &conf.indices[lo..hi];
            // The copies start on a cache line (a row of 32 factors is then two
            // lines, not three): `pad` values in front of them.
            scratch.items.clear();
            scratch.items.reserve(cols.len() * d + LINE_VALUES);
            let pad = scratch
                .items
                .as_ptr()
                .align_offset(LINE_VALUES * 4)
                .min(LINE_VALUES);
            scratch.items.resize(pad, 0.0);
            for (k, &i) in cols.iter().enumerate() {
                if let Some(&ahead) = cols.get(k + GATHER_PREFETCH) {
                    prefetch_row(&self.y[ahead as usize * d..(ahead as usize + 1) * d]);
                }
                if let Some(&ahead) = cols.get(k + GATHER_PREFETCH_FAR) {
                    prefetch_row_far(&self.y[ahead as usize * d..(ahead as usize + 1) * d]);
                }
                let i = i as usize;
                scratch.items.extend_from_slice(&self.y[i * d..(i + 1) * d]);
            }
        }
        let CgScratch {
            items,
            r,
            p,
            ap,
            rs_old,
            active,
        } = scratch;
        let (r, p, ap) = (&mut r[..m * d], &mut p[..m * d], &mut ap[..m * d]);
        let y = self.y;
        // the values in front of the gathered rows
        let pad = if gathered {
            items.len() - (hi - lo) * d
        } else {
            0
        };
        // The item rows of block row `u` and their confidences.
        let row = |u: usize| {
            let (a, b) = (
                conf.indptr[first + u] as usize,
                conf.indptr[first + u + 1] as usize,
            );
            let rows = if gathered {
                ItemRows::Gathered(&items[pad + (a - lo) * d..pad + (b - lo) * d])
            } else {
                ItemRows::Direct(&conf.indices[a..b])
            };
            (rows, &conf.values[a..b])
        };

        // r = Yᵀ C_u p_u − (A + Yᵀ(C_u − I)Y) x
        block_times_a::<FMA, WIDE>(-1.0, xb, self.a, r, d);
        for u in 0..m {
            let (rows, c) = row(u);
            let (xu, ru) = (&xb[u * d..(u + 1) * d], &mut r[u * d..(u + 1) * d]);
            sparse_terms::<FMA, WIDE, true>(rows, y, d, c, xu, ru);
            p[u * d..(u + 1) * d].copy_from_slice(ru);
            rs_old[u] = dot::<FMA, WIDE>(ru, ru);
            active[u] = rs_old[u] >= CG_TOLERANCE;
        }
        for _ in 0..self.cg_steps {
            if !active[..m].contains(&true) {
                break;
            }
            // Ap = (A + Yᵀ(C_u − I)Y) p
            block_times_a::<FMA, WIDE>(1.0, p, self.a, ap, d);
            for u in 0..m {
                if !active[u] {
                    continue;
                }
                let (rows, c) = row(u);
                let span = u * d..(u + 1) * d;
                let (pu, apu) = (&p[span.clone()], &mut ap[span.clone()]);
                sparse_terms::<FMA, WIDE, false>(rows, y, d, c, pu, apu);
                let p_ap = dot::<FMA, WIDE>(pu, apu);
                if p_ap.is_nan() || p_ap <= 0.0 {
                    // Only when the system is not positive definite (λ = 0 and
                    // degenerate factors): stop rather than step to infinity.
                    active[u] = false;
                    continue;
                }
                let alpha = rs_old[u] / p_ap;
                let (xu, ru) = (&mut xb[span.clone()], &mut r[span.clone()]);
                axpy::<FMA>(alpha, pu, xu);
                axpy::<FMA>(-alpha, apu, ru);
                let rs_new = dot::<FMA, WIDE>(ru, ru);
                if rs_new < CG_TOLERANCE {
                    active[u] = false;
                    continue;
                }
                let beta = rs_new / rs_old[u];
                for (pv, &rv) in p[span].iter_mut().zip(ru.iter()) {
                    *pv = madd::<FMA>(beta, *pv, rv);
                }
                rs_old[u] = rs_new;
            }
        }
        if !self.pair_loss {
            return 0.0;
        }
        let mut loss = 0.0f64;
        for u in 0..m {
            let (rows, c) = row(u);
            loss += pair_loss::<FMA, WIDE>(rows, y, d, c, &xb[u * d..(u + 1) * d]);
        }
        loss
    }
}

/// How many item rows ahead the gather of a block asks for its rows: the rows
/// are scattered over `y`, and each is a few cache lines. Rows
/// [`GATHER_PREFETCH_FAR`] ahead are asked into the outer caches first, so that
/// more of the misses overlap (at 1M users, 32 factors, the item half-step's
/// gather of 12.9M user rows: 0.37 -> 0.25 s with 2 threads, once the rows start
/// on cache lines, see [`crate::alloc`]).
const GATHER_PREFETCH: usize = 8;
/// The values of one cache line.
const LINE_VALUES: usize = 16;
const GATHER_PREFETCH_FAR: usize = 48;
/// Blocks gather their item rows only from a `y` larger than this (bytes): a
/// smaller one stays in the mid-level cache, and its rows are read in place
/// (measured on a 3,665 x 64 `y`: the copies took ~20 % of the half-steps). From
/// a `y` that only the last-level cache holds (50,000 x 32 item rows, 6.4 MB)
/// the gathered rows, which start on a cache line, are faster than the rows in
/// place: 0.35 -> 0.28 s for the user half-step at 1M users on the AVX-512
/// kernels (measured with `y` on lines too).
const GATHER_MIN_Y_BYTES: usize = 2 << 20;

/// The most values one block gathers (16 MiB): a row with more item rows than
/// that reads them where they are in `y`. A long row (a popular item's users)
/// is gathered alone: read at random once, then its CG steps and loss stream
/// the copy, instead of reading `y` at random four or five times.
const CG_GATHER_MAX: usize = 1 << 22;

/// Asks the CPU to bring `row` into the first-level cache (no effect on the values).
#[inline(always)]
pub(crate) fn prefetch_row(row: &[f32]) {
    prefetch_lines::<PREFETCH_NEAR>(row);
}

/// Asks the CPU to bring `row` towards the core, into the outer caches: many
/// such requests can be in flight where the first-level cache has room for few.
#[inline(always)]
fn prefetch_row_far(row: &[f32]) {
    prefetch_lines::<PREFETCH_FAR>(row);
}

/// x86's prefetch hints: into every cache level (`_MM_HINT_T0`), into the outer
/// levels only (`_MM_HINT_T2`).
const PREFETCH_NEAR: i32 = 3;
const PREFETCH_FAR: i32 = 1;

/// Every cache line of `row`, prefetched with `HINT`.
#[inline(always)]
fn prefetch_lines<const HINT: i32>(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        // SAFETY: a prefetch hint reads nothing and cannot fault; the address is
        // that of an element of `row`.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(line.as_ptr().cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Where the item rows of one CG row are read from.
#[derive(Clone, Copy)]
enum ItemRows<'a> {
    /// Copied out, one after the other.
    Gathered(&'a [f32]),
    /// Rows of `y` at these indices.
    Direct(&'a [u32]),
}

impl<'a> ItemRows<'a> {
    #[inline(always)]
    fn get(self, y: &'a [f32], d: usize, k: usize) -> &'a [f32] {
        match self {
            ItemRows::Gathered(v) => &v[k * d..(k + 1) * d],
            ItemRows::Direct(cols) => {
                let i = cols[k] as usize;
                &y[i * d..(i + 1) * d]
            }
        }
    }
}

/// `out = alpha · (block · A)` for the row-major `block` (`out.len() / d` rows of
/// `d`) and the `d x d` matrix `a`: [`avx512::block_times_a`] with `WIDE`,
/// [`avx2::block_times_a`] with `FMA` on x86-64, one `sgemm` otherwise.
#[inline(always)]
fn block_times_a<const FMA: bool, const WIDE: bool>(
    alpha: f32,
    block: &[f32],
    a: &[f32],
    out: &mut [f32],
    d: usize,
) {
    let m = block.len() / d;
    assert_eq!(out.len(), m * d, "block and out differ in size");
    assert_eq!(a.len(), d * d, "a is not d x d");
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        // SAFETY: `WIDE` is only instantiated by `CgJob::solve_block_avx512`,
        // which runs on CPUs with AVX-512F, AVX2 and FMA for d <= MAX_D.
        return unsafe { avx512::block_times_a(alpha, block, a, out, d) };
    }
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `dot`: only reached once AVX2 and FMA were detected.
        return unsafe { avx2::block_times_a(alpha, block, a, out, d) };
    }
    // SAFETY: sgemm reads `block` as m x d with strides (d, 1) (last element
    // (m-1)*d + d-1 < block.len()), `a` as d x d with strides (d, 1) (last element
    // d*d - 1 < a.len()) and writes `out` as m x d with strides (d, 1), last
    // element < out.len() = m*d. `out` is a separate &mut, so it aliases neither
    // input; beta = 0, so its old contents are never read.
    unsafe {
        matrixmultiply::sgemm(
            m,
            d,
            d,
            alpha,
            block.as_ptr(),
            d as isize,
            1,
            a.as_ptr(),
            d as isize,
            1,
            0.0,
            out.as_mut_ptr(),
            d as isize,
            1,
        );
    }
}

/// Item rows per round of [`sparse_terms`]: their dot products, then their
/// updates, while the rows are still in L1.
const SPARSE_ROUND: usize = 32;

/// `out += Σ_k coef_k y_k` over the item rows `y_k` of one CG row with
/// confidences `c`: `coef_k = c_k − (c_k − 1)(y_k · v)` for the residual
/// (`RESIDUAL`), `(c_k − 1)(y_k · v)` for the product with `v`. The terms are
/// added in item order. With `WIDE`, [`avx512::sparse_terms`]; otherwise in
/// rounds of [`SPARSE_ROUND`] items.
#[inline(always)]
fn sparse_terms<const FMA: bool, const WIDE: bool, const RESIDUAL: bool>(
    rows: ItemRows<'_>,
    y: &[f32],
    d: usize,
    c: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        // SAFETY: as in `block_times_a`.
        return unsafe { avx512::sparse_terms::<RESIDUAL>(|k| rows.get(y, d, k), c, v, out) };
    }
    let mut coef = [0.0f32; SPARSE_ROUND];
    for start in (0..c.len()).step_by(SPARSE_ROUND) {
        let n = SPARSE_ROUND.min(c.len() - start);
        let row = |k: usize| rows.get(y, d, start + k);
        dots::<FMA>(row, v, &mut coef[..n]);
        for (t, &ck) in coef[..n].iter_mut().zip(&c[start..start + n]) {
            let scaled = (ck - 1.0) * *t;
            *t = if RESIDUAL { ck - scaled } else { scaled };
        }
        axpys::<FMA>(row, &coef[..n], out);
    }
}

/// `out[k] = row(k) · v` for every `k < out.len()`.
#[inline(always)]
fn dots<'a, const FMA: bool>(row: impl Fn(usize) -> &'a [f32], v: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `dot`: only reached once AVX2 and FMA were detected.
        return unsafe { avx2::dots(row, v, out) };
    }
    for (k, o) in out.iter_mut().enumerate() {
        *o = dot::<FMA, false>(row(k), v);
    }
}

/// `out += Σ_k coef[k] row(k)`, the terms added in `k` order.
#[inline(always)]
fn axpys<'a, const FMA: bool>(row: impl Fn(usize) -> &'a [f32], coef: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `dot`: only reached once AVX2 and FMA were detected.
        return unsafe { avx2::axpys(row, coef, out) };
    }
    for (k, &ck) in coef.iter().enumerate() {
        axpy::<FMA>(ck, row(k), out);
    }
}

/// `Σ_k c_k (1 − s_k)² − s_k²` with `s_k = y_k · x` (in f64 after the dot).
#[inline(always)]
fn pair_loss<const FMA: bool, const WIDE: bool>(
    rows: ItemRows<'_>,
    y: &[f32],
    d: usize,
    c: &[f32],
    x: &[f32],
) -> f64 {
    let mut total = 0.0f64;
    let mut dot_of = [0.0f32; SPARSE_ROUND];
    for start in (0..c.len()).step_by(SPARSE_ROUND) {
        let n = SPARSE_ROUND.min(c.len() - start);
        let row = |k: usize| rows.get(y, d, start + k);
        #[cfg(target_arch = "x86_64")]
        if WIDE {
            // SAFETY: as in `block_times_a`.
            unsafe { avx512::dots(row, x, &mut dot_of[..n]) };
        } else {
            dots::<FMA>(row, x, &mut dot_of[..n]);
        }
        #[cfg(not(target_arch = "x86_64"))]
        dots::<FMA>(row, x, &mut dot_of[..n]);
        for (&s, &ck) in dot_of[..n].iter().zip(&c[start..start + n]) {
            let s = f64::from(s);
            total += f64::from(ck) * (1.0 - s) * (1.0 - s) - s * s;
        }
    }
    total
}

/// `a * b + c`, with one rounding when `FMA`.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `y += alpha x`.
#[inline(always)]
fn axpy<const FMA: bool>(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv = madd::<FMA>(alpha, xv, *yv);
    }
}

/// Independent accumulators of the portable [`dot`]: four AVX registers of f32,
/// so that the additions of one product are not one long dependency chain.
const DOT_LANES: usize = 32;

/// Dot product. With `WIDE` it is [`avx512::dot`], with `FMA` on x86-64
/// [`avx2::dot`]; otherwise [`DOT_LANES`] independent accumulators summed in a
/// fixed tree.
#[inline(always)]
fn dot<const FMA: bool, const WIDE: bool>(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        // SAFETY: as in `block_times_a`.
        return unsafe { avx512::dot(x, y) };
    }
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: on x86-64, `FMA = true` is only instantiated by
        // `CgJob::solve_block_fma` and `CgJob::solve_block_avx512`, which run
        // only where the CPU was found to have AVX2 and FMA.
        return unsafe { avx2::dot(x, y) };
    }
    let (xc, xr) = x.as_chunks::<DOT_LANES>();
    let (yc, yr) = y.as_chunks::<DOT_LANES>();
    let mut acc = [0.0f32; DOT_LANES];
    for (a, b) in xc.iter().zip(yc) {
        for l in 0..DOT_LANES {
            acc[l] = madd::<FMA>(a[l], b[l], acc[l]);
        }
    }
    for (l, (a, b)) in xr.iter().zip(yr).enumerate() {
        acc[l] = madd::<FMA>(*a, *b, acc[l]);
    }
    let mut width = DOT_LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0]
}

/// The CG's vector kernels in AVX2 + FMA, for CPUs that have them.
#[cfg(target_arch = "x86_64")]
mod avx2 {
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
                let (va, vb) =
                    unsafe { (_mm256_loadu_ps(vp.add(i)), _mm256_loadu_ps(vp.add(i + 8))) };
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testing::{Rng, bits};
    use crate::{Backend, CpuBackend, Resident, reference};

    /// Every backend the tests run on (one test body, every backend).
    fn backends() -> Vec<Box<dyn Backend>> {
        vec![Box::new(CpuBackend::new())]
    }

    fn params(regularization: f32, cg_steps: u32) -> CgParams {
        CgParams {
            regularization,
            cg_steps,
            pair_loss: false,
        }
    }

    /// `x` after one `als_solve` on `backend`.
    fn solve_on(
        backend: &dyn Backend,
        x: &[f32],
        y: &[f32],
        d: usize,
        yty: &[f64],
        conf: &Csr,
        p: CgParams,
    ) -> Vec<f32> {
        let mut xr = backend.upload(x, d).unwrap();
        let yr = backend.upload(y, d).unwrap();
        let cr = backend.upload_sparse(conf).unwrap();
        backend.als_solve(&mut xr, &yr, yty, &cr, p).unwrap();
        let all: Vec<u32> = (0..xr.n() as u32).collect();
        backend.download_rows(&xr, &all).unwrap()
    }

    fn norm(v: impl IntoIterator<Item = f64>) -> f64 {
        v.into_iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    // -----------------------------------------------------------------------
    // gram

    #[test]
    fn gram_matches_reference() {
        let mut rng = Rng(101);
        for backend in backends() {
            for &n in &[
                0,
                1,
                GRAM_BLOCK_ROWS - 1,
                GRAM_BLOCK_ROWS,
                GRAM_BLOCK_ROWS + 1,
                3000,
            ] {
                for &d in &[1, 3, 16, 33] {
                    // Columns with different offsets and scales, so that some
                    // entries cancel and some do not.
                    let a: Vec<f32> = (0..n * d)
                        .map(|k| rng.unit() * (1 + k % d) as f32 + (k % 3) as f32 - 1.0)
                        .collect();
                    let got = backend.gram(&backend.upload(&a, d).unwrap()).unwrap();
                    let want = reference::gram(&a, d);
                    assert_eq!(got.len(), d * d);
                    for i in 0..d {
                        for j in 0..d {
                            let (g, w) = (got[i * d + j], want[i * d + j]);
                            // |AᵀA_ij| <= sqrt(AᵀA_ii AᵀA_jj): the entries' own scale.
                            let scale = (want[i * d + i] * want[j * d + j]).sqrt().max(1e-30);
                            assert!(
                                (g - w).abs() <= 1e-6 * scale,
                                "n={n} d={d} ({i}, {j}): {g} vs {w}"
                            );
                            assert_eq!(g.to_bits(), got[j * d + i].to_bits(), "not symmetric");
                        }
                    }
                }
            }
        }
    }

    // -----------------------------------------------------------------------
    // als_solve

    /// A random implicit-ALS problem: `users x d` warm start, `items x d` fixed
    /// factors, and confidences.
    struct Problem {
        x: Vec<f32>,
        y: Vec<f32>,
        yty: Vec<f64>,
        conf: Csr,
    }

    impl Problem {
        /// Appends a row with confidences `values` at items `cols` and the
        /// starting factors `x_row`.
        fn push_row(&mut self, cols: &[u32], values: &[f32], x_row: Vec<f32>) {
            let last = *self.conf.indptr.last().unwrap();
            self.conf.indptr.push(last + cols.len() as u64);
            self.conf.indices.extend(cols);
            self.conf.values.extend(values);
            self.conf.rows += 1;
            self.x.extend(x_row);
        }
    }

    fn problem(rng: &mut Rng, users: usize, items: usize, d: usize, density: f32) -> Problem {
        let y = rng.values(items * d, 0.5);
        let yty = reference::gram(&y, d);
        Problem {
            x: rng.values(users * d, 0.3),
            yty,
            conf: rng.confidences(users, items, density),
            y,
        }
    }

    #[test]
    fn als_solve_matches_reference_cg() {
        let mut rng = Rng(102);
        for backend in backends() {
            for &(users, items, d) in &[(1, 5, 1), (40, 60, 3), (300, 200, 16), (50, 120, 37)] {
                // Few steps: two f32 CGs that round differently drift apart in the
                // middle of convergence (by ~1e-3 after a dozen steps here, before
                // both settle on the solution), so longer runs are compared with the
                // exact solve instead.
                for &(lambda, steps) in &[(0.1, 3), (1.0, 1), (0.0, 3), (0.5, 5)] {
                    let pb = problem(&mut rng, users, items, d, 0.1);
                    let p = params(lambda, steps);
                    let got = solve_on(&*backend, &pb.x, &pb.y, d, &pb.yty, &pb.conf, p);
                    let mut want = pb.x.clone();
                    reference::als_solve(&mut want, &pb.y, d, &pb.yty, &pb.conf, p);
                    for (u, (g, w)) in got.chunks_exact(d).zip(want.chunks_exact(d)).enumerate() {
                        let scale = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                        for (a, b) in g.iter().zip(w) {
                            assert!(
                                (a - b).abs() <= 1e-4 * scale,
                                "users={users} d={d} λ={lambda} steps={steps} row {u}: {g:?} vs {w:?}"
                            );
                        }
                    }
                    // The solve moved the rows that had somewhere to go.
                    assert_ne!(bits(&got), bits(&pb.x));
                }
            }
        }
    }

    #[test]
    fn every_kernel_set_matches_the_reference_cg_and_loss() {
        // Each set this CPU runs (on an AVX-512 machine all three), on the
        // shapes where its registers end: d around 16, 64 and 128 (the AVX-512
        // kernels' widths, groups of four rows up to 64, one row above, masked
        // tails), rows of 0 to 9 items (group remainders), odd row counts (the
        // block products' last row alone), and a `y` over the gather threshold
        // with a row over the gather budget.
        let mut rng = Rng(131);
        let cases: &[(usize, usize, usize, f32)] = &[
            (31, 9, 1, 0.5),
            (31, 9, 15, 0.5),
            (31, 9, 16, 0.5),
            (31, 9, 17, 0.5),
            (41, 60, 48, 0.1),
            (41, 60, 64, 0.1),
            (41, 60, 65, 0.1),
            (31, 40, 90, 0.15),
            (31, 40, 100, 0.15),
            (31, 40, 128, 0.15),
            (31, 40, 129, 0.15),
            (12, 9000, 64, 0.05),
            (6, 70_000, 64, 0.001),
        ];
        for &(users, items, d, density) in cases {
            let mut pb = problem(&mut rng, users, items, d, density);
            // Rows of exactly 0..=9 items (the first ones), and thereby an odd
            // row count on both sides of every block product.
            for len in 0..=9.min(items) {
                let cols: Vec<u32> = (0..len as u32).collect();
                let values: Vec<f32> = rng
                    .values(len, 20.0)
                    .iter()
                    .map(|v| 1.0 + v.abs())
                    .collect();
                pb.push_row(&cols, &values, rng.values(d, 0.3));
            }
            if items == 9000 {
                // One row with every item: over the block budget, gathered alone
                // (above the smaller kernels' gather threshold).
                let full = rng.confidences(1, items, 1.0);
                pb.push_row(&full.indices, &full.values, rng.values(d, 0.3));
                assert!(items * d * 4 > GATHER_MIN_Y_BYTES && items * d > CG_GATHER_BUDGET);
            }
            if items == 70_000 {
                // A y over every kernel set's gather threshold: one row with
                // every item (over the largest gather: read in place), one with a
                // third of them (gathered alone).
                let full = rng.confidences(1, items, 1.0);
                pb.push_row(&full.indices, &full.values, rng.values(d, 0.3));
                let third = rng.confidences(1, items, 0.33);
                pb.push_row(&third.indices, &third.values, rng.values(d, 0.3));
                assert!(items * d * 4 > GATHER_MIN_Y_BYTES && items * d > CG_GATHER_MAX);
                assert!(third.indices.len() * d > CG_GATHER_BUDGET);
            }
            let p = CgParams {
                regularization: 0.1,
                cg_steps: 3,
                pair_loss: true,
            };
            let mut want = pb.x.clone();
            reference::als_solve(&mut want, &pb.y, d, &pb.yty, &pb.conf, p);
            let want_loss = reference::pair_loss(&want, &pb.y, d, &pb.conf);
            for isa in Isa::available(d) {
                let mut got = pb.x.clone();
                let loss = als_solve(isa, &mut got, &pb.y, d, d, &pb.yty, &pb.conf, p)
                    .unwrap()
                    .unwrap();
                for (u, (g, w)) in got.chunks_exact(d).zip(want.chunks_exact(d)).enumerate() {
                    let scale = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                    for (a, b) in g.iter().zip(w) {
                        assert!(
                            (a - b).abs() <= 1e-4 * scale,
                            "{isa:?} d={d} row {u}: {g:?} vs {w:?}"
                        );
                    }
                }
                let tolerance = 1e-4 * want_loss.abs().max(1.0);
                assert!(
                    (loss - want_loss).abs() <= tolerance,
                    "{isa:?} d={d}: loss {loss} vs {want_loss}"
                );
            }
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            assert_eq!(Isa::best(64), Isa::Avx512);
            assert_eq!(Isa::best(129), Isa::Fma);
        }
    }

    #[test]
    fn als_solve_converges_to_the_exact_solution() {
        let mut rng = Rng(103);
        for backend in backends() {
            for &d in &[1, 4, 16, 32] {
                let pb = problem(&mut rng, 60, 150, d, 0.15);
                let lambda = 0.5;
                let p = params(lambda, 2 * d as u32);
                let got = solve_on(&*backend, &pb.x, &pb.y, d, &pb.yty, &pb.conf, p);
                for (u, g) in got.chunks_exact(d).enumerate() {
                    let (cols, conf) = pb.conf.row(u);
                    let exact = reference::als_exact_row(&pb.yty, lambda, &pb.y, d, cols, conf);
                    let err = norm(g.iter().zip(&exact).map(|(&a, &b)| f64::from(a) - b));
                    assert!(
                        err <= 1e-3 * norm(exact.iter().copied()).max(1e-3),
                        "d={d} row {u} ({} items): {g:?} vs {exact:?}",
                        cols.len()
                    );
                }
            }
        }
    }

    #[test]
    fn als_solve_lowers_the_objective() {
        let mut rng = Rng(104);
        for backend in backends() {
            let (users, items, d, lambda) = (40, 100, 12, 0.3);
            let pb = problem(&mut rng, users, items, d, 0.1);
            let objective = |x: &[f32]| -> Vec<f64> {
                x.chunks_exact(d)
                    .enumerate()
                    .map(|(u, xu)| {
                        let (cols, conf) = pb.conf.row(u);
                        reference::als_row_objective(&pb.y, d, cols, conf, lambda, xu)
                    })
                    .collect()
            };
            let minimum: Vec<f64> = (0..users)
                .map(|u| {
                    let (cols, conf) = pb.conf.row(u);
                    let exact = reference::als_exact_row(&pb.yty, lambda, &pb.y, d, cols, conf);
                    let exact: Vec<f32> = exact.iter().map(|&v| v as f32).collect();
                    reference::als_row_objective(&pb.y, d, cols, conf, lambda, &exact)
                })
                .collect();

            let mut x = pb.x.clone();
            let mut before = objective(&x);
            for half_step in 0..4 {
                x = solve_on(
                    &*backend,
                    &x,
                    &pb.y,
                    d,
                    &pb.yty,
                    &pb.conf,
                    params(lambda, 3),
                );
                let after = objective(&x);
                for u in 0..users {
                    let (b, a, m) = (before[u], after[u], minimum[u]);
                    if half_step == 0 {
                        assert!(a < b, "row {u}: {b} -> {a}");
                    } else {
                        // Near the optimum f32 rounding may leave it where it is.
                        assert!(
                            a <= b + 1e-6 * b,
                            "half-step {half_step}, row {u}: {b} -> {a}"
                        );
                    }
                    assert!(a >= m - 1e-5 * m, "row {u}: {a} is below the minimum {m}");
                }
                before = after;
            }
        }
    }

    #[test]
    fn als_row_without_interactions_goes_to_zero() {
        let mut rng = Rng(105);
        for backend in backends() {
            let d = 10;
            let y = rng.values(80 * d, 0.5);
            let yty = reference::gram(&y, d);
            // Row 1 has interactions, rows 0 and 2 none; row 2 starts at zero.
            let conf = Csr {
                rows: 3,
                cols: 80,
                indptr: vec![0, 0, 2, 2],
                indices: vec![3, 50],
                values: vec![4.0, 2.0],
            };
            let mut x = rng.values(3 * d, 1.0);
            x[2 * d..].fill(0.0);
            let got = solve_on(&*backend, &x, &y, d, &yty, &conf, params(0.2, 2 * d as u32));
            let exact = reference::als_exact_row(&yty, 0.2, &y, d, &[], &[]);
            assert!(exact.iter().all(|&v| v == 0.0), "{exact:?}");
            let start = norm(x[..d].iter().map(|&v| f64::from(v)));
            let end = norm(got[..d].iter().map(|&v| f64::from(v)));
            assert!(end <= 1e-3 * start, "{start} -> {end}: {:?}", &got[..d]);
            assert!(
                got[2 * d..].iter().all(|&v| v == 0.0),
                "{:?}",
                &got[2 * d..]
            );
            assert!(norm(got[d..2 * d].iter().map(|&v| f64::from(v))) > 1e-2);
        }
    }

    #[test]
    fn als_rows_do_not_depend_on_other_rows() {
        let mut rng = Rng(106);
        for backend in backends() {
            let (users, items, d) = (200, 90, 24);
            let pb = problem(&mut rng, users, items, d, 0.2);
            let p = params(0.4, 3);
            let all = solve_on(&*backend, &pb.x, &pb.y, d, &pb.yty, &pb.conf, p);
            for &u in &[0, 1, 63, 64, 199] {
                let (cols, conf) = pb.conf.row(u);
                let alone = Csr {
                    rows: 1,
                    cols: items,
                    indptr: vec![0, cols.len() as u64],
                    indices: cols.to_vec(),
                    values: conf.to_vec(),
                };
                let x = &pb.x[u * d..(u + 1) * d];
                let got = solve_on(&*backend, x, &pb.y, d, &pb.yty, &alone, p);
                assert_eq!(bits(&got), bits(&all[u * d..(u + 1) * d]), "row {u}");
            }
        }
    }

    #[test]
    fn als_solve_with_zero_steps_leaves_x_unchanged() {
        let mut rng = Rng(107);
        for backend in backends() {
            let pb = problem(&mut rng, 20, 30, 5, 0.3);
            let got = solve_on(
                &*backend,
                &pb.x,
                &pb.y,
                5,
                &pb.yty,
                &pb.conf,
                params(0.1, 0),
            );
            assert_eq!(bits(&got), bits(&pb.x));
        }
    }

    // -----------------------------------------------------------------------
    // Uploads, writes and errors

    #[test]
    fn sparse_upload_rejects_non_finite_values_naming_row_and_column() {
        let mut rng = Rng(112);
        for backend in backends() {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut m = rng.confidences(6, 20, 0.4);
                // The first stored value of row 2 (row 2 has some at this density).
                let pos = m.indptr[2] as usize;
                assert!(pos < m.indptr[3] as usize);
                let col = m.indices[pos] as usize;
                m.values[pos] = bad;
                // A later bad value must not hide the first one.
                let last = m.values.len() - 1;
                m.values[last] = f32::NAN;
                match backend.upload_sparse(&m) {
                    Err(KernelError::NonFinitePoint { row, col: c, value }) => {
                        assert_eq!((row, c), (2, col));
                        assert_eq!(value.to_bits(), bad.to_bits());
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    #[test]
    fn sparse_upload_rejects_malformed_structure() {
        for backend in backends() {
            let good = Csr {
                rows: 3,
                cols: 4,
                indptr: vec![0, 2, 2, 3],
                indices: vec![0, 3, 1],
                values: vec![1.0, 2.0, 3.0],
            };
            let r = backend.upload_sparse(&good).unwrap();
            assert_eq!((r.n(), r.d()), (3, 4));

            let broken = [
                Csr {
                    indptr: vec![0, 2, 3],
                    ..good.clone()
                },
                Csr {
                    indptr: vec![0, 5, 2, 3],
                    ..good.clone()
                },
                Csr {
                    indptr: vec![1, 2, 2, 3],
                    ..good.clone()
                },
                Csr {
                    indices: vec![3, 0, 1],
                    ..good.clone()
                },
                Csr {
                    indices: vec![0, 0, 1],
                    ..good.clone()
                },
                Csr {
                    indices: vec![0, 4, 1],
                    ..good.clone()
                },
                Csr {
                    values: vec![1.0, 2.0],
                    ..good.clone()
                },
            ];
            for m in &broken {
                assert!(
                    matches!(backend.upload_sparse(m), Err(KernelError::Shape(_))),
                    "{m:?}"
                );
            }
        }
    }

    #[test]
    fn write_rows_overwrites_rows_and_validates() {
        let mut rng = Rng(113);
        for backend in backends() {
            let d = 3;
            let start = rng.values(6 * d, 1.0);
            let mut r = backend.upload(&start, d).unwrap();
            let new = rng.values(3 * d, 1.0);
            backend.write_rows(&mut r, &[4, 1, 4], &new).unwrap();
            let all: Vec<u32> = (0..6).collect();
            let got = backend.download_rows(&r, &all).unwrap();
            let mut want = start.clone();
            want[d..2 * d].copy_from_slice(&new[d..2 * d]);
            // Row 4 is written twice: the last values win.
            want[4 * d..5 * d].copy_from_slice(&new[2 * d..3 * d]);
            assert_eq!(got, want);

            // Errors leave the rows as they were.
            assert!(matches!(
                backend.write_rows(&mut r, &[0, 6], &new[..2 * d]),
                Err(KernelError::Shape(_))
            ));
            assert!(matches!(
                backend.write_rows(&mut r, &[0, 1], &new[..2 * d - 1]),
                Err(KernelError::Shape(_))
            ));
            let mut bad = new.clone();
            bad[d + 2] = f32::NAN;
            match backend.write_rows(&mut r, &[0, 5, 2], &bad) {
                Err(KernelError::NonFinitePoint { row: 5, col: 2, .. }) => {}
                other => panic!("unexpected {other:?}"),
            }
            assert_eq!(backend.download_rows(&r, &all).unwrap(), want);

            // A sparse resident is not a dense target.
            let mut sparse = backend.upload_sparse(&rng.confidences(6, 3, 0.5)).unwrap();
            assert!(matches!(
                backend.write_rows(&mut sparse, &[0], &new[..d]),
                Err(KernelError::Shape(_))
            ));
        }
    }

    #[test]
    fn als_solve_rejects_bad_shapes_and_values() {
        let mut rng = Rng(114);
        for backend in backends() {
            let (users, items, d) = (5, 7, 3);
            let pb = problem(&mut rng, users, items, d, 0.5);
            let mut x = backend.upload(&pb.x, d).unwrap();
            let y = backend.upload(&pb.y, d).unwrap();
            let conf = backend.upload_sparse(&pb.conf).unwrap();
            let p = params(0.1, 3);
            let shape =
                |r: Result<Option<f64>, KernelError>| matches!(r, Err(KernelError::Shape(_)));

            let y_wide = backend
                .upload(&rng.values(items * (d + 1), 1.0), d + 1)
                .unwrap();
            assert!(shape(backend.als_solve(&mut x, &y_wide, &pb.yty, &conf, p)));
            let y_short = backend.upload(&pb.y[..(items - 1) * d], d).unwrap();
            assert!(shape(
                backend.als_solve(&mut x, &y_short, &pb.yty, &conf, p)
            ));
            let mut x_short = backend.upload(&pb.x[..(users - 1) * d], d).unwrap();
            assert!(shape(backend.als_solve(
                &mut x_short,
                &y,
                &pb.yty,
                &conf,
                p
            )));
            assert!(shape(backend.als_solve(
                &mut x,
                &y,
                &pb.yty[..d * d - 1],
                &conf,
                p
            )));
            let mut yty_nan = pb.yty.clone();
            yty_nan[4] = f64::NAN;
            assert!(shape(backend.als_solve(&mut x, &y, &yty_nan, &conf, p)));
            assert!(shape(backend.als_solve(
                &mut x,
                &y,
                &pb.yty,
                &conf,
                params(-1.0, 3)
            )));
            assert!(shape(backend.als_solve(
                &mut x,
                &y,
                &pb.yty,
                &conf,
                params(f32::NAN, 3)
            )));
            // Dense where sparse is expected, and the other way round.
            assert!(shape(backend.als_solve(&mut x, &y, &pb.yty, &y, p)));
            assert!(shape(backend.als_solve(&mut x, &conf, &pb.yty, &conf, p)));

            // A confidence below 1, named by row and item.
            let mut low = pb.conf.clone();
            let pos = low.indptr[3] as usize;
            assert!(pos < low.indptr[4] as usize);
            low.values[pos] = 0.5;
            let low_r = backend.upload_sparse(&low).unwrap();
            let err = backend
                .als_solve(&mut x, &y, &pb.yty, &low_r, p)
                .unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(&format!("row 3, item {}", low.indices[pos])),
                "{message}"
            );

            // None of the failures touched x.
            let all: Vec<u32> = (0..users as u32).collect();
            assert_eq!(backend.download_rows(&x, &all).unwrap(), pb.x);
        }
    }

    #[test]
    fn top_n_and_gram_reject_bad_shapes() {
        let mut rng = Rng(115);
        for backend in backends() {
            let q = backend.upload(&rng.values(4 * 3, 1.0), 3).unwrap();
            let i = backend.upload(&rng.values(9 * 3, 1.0), 3).unwrap();
            let i_wide = backend.upload(&rng.values(9 * 4, 1.0), 4).unwrap();
            assert!(matches!(
                backend.top_n(&q, &i_wide, 2, None),
                Err(KernelError::Shape(_))
            ));
            for (rows, cols) in [(3, 9), (4, 8), (4, 10)] {
                let ex = backend
                    .upload_sparse(&rng.confidences(rows, cols, 0.3))
                    .unwrap();
                assert!(
                    matches!(
                        backend.top_n(&q, &i, 2, Some(&ex)),
                        Err(KernelError::Shape(_))
                    ),
                    "{rows} x {cols}"
                );
            }
            // Dense where the exclusions should be sparse, sparse where items should be.
            assert!(matches!(
                backend.top_n(&q, &i, 2, Some(&q)),
                Err(KernelError::Shape(_))
            ));
            let ex = backend.upload_sparse(&rng.confidences(4, 9, 0.3)).unwrap();
            assert!(matches!(
                backend.top_n(&q, &ex, 2, None),
                Err(KernelError::Shape(_))
            ));
            assert!(matches!(backend.gram(&ex), Err(KernelError::Shape(_))));
            assert!(backend.top_n(&q, &i, 2, Some(&ex)).is_ok());
        }
    }

    #[test]
    fn residents_of_another_backend_are_rejected() {
        let cpu = CpuBackend::new();
        let foreign = Resident::new(2, 2, "cuda:0", Box::new(()));
        let mine = cpu.upload(&[1.0; 4], 2).unwrap();
        assert!(matches!(
            cpu.gram(&foreign),
            Err(KernelError::ForeignPoints("cuda:0"))
        ));
        assert!(matches!(
            cpu.top_n(&mine, &foreign, 1, None),
            Err(KernelError::ForeignPoints("cuda:0"))
        ));
        let mut foreign_mut = Resident::new(2, 2, "cuda:0", Box::new(()));
        assert!(matches!(
            cpu.write_rows(&mut foreign_mut, &[0], &[1.0, 1.0]),
            Err(KernelError::ForeignPoints("cuda:0"))
        ));
    }

    // -----------------------------------------------------------------------
    // Threads

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let mut rng = Rng(116);
        let cpu = CpuBackend::new();
        let d = 16;
        // Magnitudes from 2^-20 to 2^20 make the f64 sums round, so the order of
        // additions shows.
        let n = 3 * GRAM_BLOCK_ROWS + 77;
        let a: Vec<f32> = (0..n * d)
            .map(|_| rng.unit() * 2f32.powi(rng.below(41) as i32 - 20))
            .collect();
        let a = cpu.upload(&a, d).unwrap();
        let pb = problem(&mut rng, 500, 300, d, 0.05);
        let (x, y) = (cpu.upload(&pb.x, d).unwrap(), cpu.upload(&pb.y, d).unwrap());
        let conf = cpu.upload_sparse(&pb.conf).unwrap();
        let ex = cpu.upload_sparse(&rng.confidences(500, 300, 0.05)).unwrap();
        let all: Vec<u32> = (0..500).collect();

        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let g = cpu.gram(&a).unwrap();
                let mut xs = cpu
                    .upload(&cpu.download_rows(&x, &all).unwrap(), d)
                    .unwrap();
                cpu.als_solve(&mut xs, &y, &pb.yty, &conf, params(0.1, 3))
                    .unwrap();
                let t = cpu.top_n(&xs, &y, 20, Some(&ex)).unwrap();
                (g, cpu.download_rows(&xs, &all).unwrap(), t)
            })
        };
        let (g1, x1, t1) = run(1);
        for threads in [2, 3] {
            let (g, x, t) = run(threads);
            let g_bits = |g: &[f64]| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(g_bits(&g1), g_bits(&g), "gram, {threads} threads");
            assert_eq!(bits(&x1), bits(&x), "als_solve, {threads} threads");
            assert_eq!(t1.items, t.items, "top_n, {threads} threads");
            assert_eq!(
                bits(&t1.scores),
                bits(&t.scores),
                "top_n, {threads} threads"
            );
        }
    }
}
