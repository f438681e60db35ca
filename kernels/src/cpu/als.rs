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
use super::als_avx2 as avx2;
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
        // The gathered copies start on a cache line (a row of 32 factors is then
        // two lines, not three): `pad` values in front of them.
        let mut pad = 0;
        if gathered {
            let cols = &conf.indices[lo..hi];
            scratch.items.clear();
            scratch.items.reserve(cols.len() * d + LINE_VALUES);
            pad = scratch
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
const GATHER_PREFETCH_FAR: usize = 48;
/// The values of one cache line.
const LINE_VALUES: usize = 16;
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

#[cfg(test)]
mod tests;
