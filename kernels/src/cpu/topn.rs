//! Top-N recommendations on the CPU: for every query (a user's factors) the `n`
//! items of highest score `q · y`, best first, ties to the lower item index, with
//! exact pruning by norms (as in LEMP, Teflioudi et al.), so that most items are
//! never scored.
//!
//! The items are sorted by norm, largest first, and cut into blocks of
//! [`BLOCK`] items stored feature-major. A work item takes [`TILE`] queries
//! and walks the blocks in that order: a micro-kernel scores [`MR`] queries
//! against a block (AVX-512: `MR × BLOCK` sums in registers; each score is the
//! same chain of fused multiply-adds over the features in any kernel, so a score
//! does not depend on the block or tile it was computed in), and the scores that
//! reach a query's bar (its `n`-th best so far) are offered to its selection.
//! Since `q · y ≤ ‖q‖ ‖y‖` and every later item is no longer than the block's
//! first, a query whose `‖q‖ ‖y_first‖`, widened by the rounding bound of its
//! computed scores, is below its bar skips the block, and every later one: no
//! item it skips could have entered its list, not even on a tie. A tile stops
//! when all its queries have; the lists are those of scoring every item.

use std::cmp::Ordering;

use rayon::prelude::*;

use crate::{Csr, KernelError, NO_ITEM, TopN};

/// Items per block (four AVX-512 registers of scores per query).
pub(crate) const BLOCK: usize = 64;
/// Queries per micro-kernel call.
pub(crate) const MR: usize = 6;
/// Queries per parallel work item (the blocks are read once for all of them).
pub(crate) const TILE: usize = 8 * MR;

/// A scored item.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f32,
    item: u32,
}

/// The score used for ranking: NaN (from an overflowing dot product) ranks as -inf.
#[inline(always)]
fn rank(score: f32) -> f32 {
    if score.is_nan() {
        f32::NEG_INFINITY
    } else {
        score
    }
}

/// Strict total order of candidates: higher score first, then lower index.
#[inline(always)]
fn better(a: Candidate, b: Candidate) -> bool {
    let (ra, rb) = (rank(a.score), rank(b.score));
    ra > rb || (ra == rb && a.item < b.item)
}

fn best_first(a: &Candidate, b: &Candidate) -> Ordering {
    if better(*a, *b) {
        Ordering::Less
    } else if better(*b, *a) {
        Ordering::Greater
    } else {
        Ordering::Equal
    }
}

/// The best `n` candidates offered so far: up to `2n` are kept, and when the
/// buffer is full it is cut back to the best `n`, whose worst then becomes the bar
/// a new candidate has to beat (its score and, on a tie, its index). Candidates may
/// come in any order.
struct Selection {
    n: usize,
    /// `2n`: the buffer is cut back when it holds this many.
    cap: usize,
    buf: Vec<Candidate>,
    bar: Option<Candidate>,
}

impl Selection {
    fn new(n: usize, items: usize) -> Self {
        let cap = n.saturating_mul(2);
        Selection {
            n,
            cap,
            buf: Vec::with_capacity(cap.min(items + 1)),
            bar: None,
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.bar = None;
    }

    #[inline(always)]
    fn offer(&mut self, c: Candidate) {
        if let Some(bar) = self.bar
            && !better(c, bar)
        {
            return;
        }
        self.buf.push(c);
        if self.buf.len() >= self.cap {
            self.cut();
        }
    }

    /// Cuts the buffer back to the best `n` when it holds at least `n`, so that
    /// the bar is the `n`-th best offered so far.
    fn tighten(&mut self) {
        let len = self.buf.len();
        if self.n > 0 && (len > self.n || (len == self.n && self.bar.is_none())) {
            self.cut();
        }
    }

    /// The score an item must reach to be offered (the bar's, NaN as -inf), or
    /// -inf while there is no bar.
    fn threshold(&self) -> f32 {
        self.bar.map_or(f32::NEG_INFINITY, |b| rank(b.score))
    }

    fn cut(&mut self) {
        let n = self.n;
        self.buf.select_nth_unstable_by(n - 1, best_first);
        self.buf.truncate(n);
        self.bar = Some(self.buf[n - 1]);
    }

    /// Writes the selection, best first, padded with [`NO_ITEM`] at -inf.
    fn finish(&mut self, items: &mut [u32], scores: &mut [f32]) {
        if self.buf.len() > self.n {
            self.cut();
        }
        self.buf.sort_unstable_by(best_first);
        items.fill(NO_ITEM);
        scores.fill(f32::NEG_INFINITY);
        for ((i, s), c) in items.iter_mut().zip(scores.iter_mut()).zip(&self.buf) {
            *i = c.item;
            *s = c.score;
        }
    }
}

/// The catalogue, prepared once per call: blocks of [`BLOCK`] items in
/// decreasing norm, each stored feature-major (`d x BLOCK`, value `(k, j)` at
/// `k * BLOCK + j`), the last padded with zero rows.
struct Items {
    blocks: Vec<f32>,
    /// The original index of every slot, in norm order (padding: [`NO_ITEM`]).
    order: Vec<u32>,
    /// The norm of each block's first (longest) item.
    block_norm: Vec<f64>,
}

fn norm(row: &[f32]) -> f64 {
    row.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

impl Items {
    fn new(items: &[f32], d: usize) -> Items {
        let n = items.len() / d;
        let norms: Vec<f64> = items.par_chunks(d).map(norm).collect();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by(|&a, &b| {
            norms[b as usize]
                .total_cmp(&norms[a as usize])
                .then(a.cmp(&b))
        });
        let blocks_n = n.div_ceil(BLOCK);
        order.resize(blocks_n * BLOCK, NO_ITEM);
        let mut blocks = vec![0.0f32; blocks_n * BLOCK * d];
        blocks
            .par_chunks_mut(BLOCK * d)
            .zip(order.par_chunks(BLOCK))
            .for_each(|(block, slots)| {
                for (j, &i) in slots.iter().enumerate() {
                    if i == NO_ITEM {
                        continue;
                    }
                    let row = &items[i as usize * d..(i as usize + 1) * d];
                    for (k, &v) in row.iter().enumerate() {
                        block[k * BLOCK + j] = v;
                    }
                }
            });
        let block_norm = order
            .chunks(BLOCK)
            .map(|slots| norms[slots[0] as usize])
            .collect();
        Items {
            blocks,
            order,
            block_norm,
        }
    }
}

/// How the scores are computed: fused multiply-adds in AVX-512 registers, or
/// vectorised by the compiler with FMA; both give the same bits. CPUs without FMA
/// multiply and add apart (another rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Avx512,
    Fma,
    Portable,
}

impl Kernel {
    pub(crate) fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                return Kernel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Kernel::Fma;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            return Kernel::Fma;
        }
        #[allow(unreachable_code)]
        Kernel::Portable
    }

    /// The kernels this CPU runs (for the tests).
    #[cfg(test)]
    fn available() -> Vec<Kernel> {
        let best = Kernel::best();
        [Kernel::Avx512, Kernel::Fma, Kernel::Portable]
            .into_iter()
            .filter(|&k| {
                k == best || k == Kernel::Portable || (best == Kernel::Avx512 && k == Kernel::Fma)
            })
            .collect()
    }

    /// The scores of the `MR` queries of `x` (`MR x d`, row-major) against
    /// `block` (`d x BLOCK`): `out[q][j]`.
    fn scores(self, x: &[f32], block: &[f32], d: usize, out: &mut [[f32; BLOCK]; MR]) {
        debug_assert!(x.len() == MR * d && block.len() == BLOCK * d);
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx512` is picked only where the CPU runs AVX-512F
            // and FMA; the slices hold `MR x d` and `d x BLOCK` values (asserted
            // above in debug builds, guaranteed by the callers).
            Kernel::Avx512 => unsafe { scores_avx512(x, block, d, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Fma` is picked on x86-64 only where the CPU runs
            // AVX2 and FMA.
            Kernel::Fma => unsafe { scores_fma(x, block, d, out) },
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Fma => scores_body::<true>(x, block, d, out),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx512 => scores_body::<true>(x, block, d, out),
            Kernel::Portable => scores_body::<false>(x, block, d, out),
        }
    }
}

/// `out[q][j] = Σ_k x[q][k] y[k][j]`, `k` ascending, from 0: with `FMA` each step
/// one fused multiply-add.
#[inline(always)]
fn scores_body<const FMA: bool>(x: &[f32], block: &[f32], d: usize, out: &mut [[f32; BLOCK]; MR]) {
    for (q, acc) in out.iter_mut().enumerate() {
        *acc = [0.0; BLOCK];
        let xq = &x[q * d..(q + 1) * d];
        for (k, &xv) in xq.iter().enumerate() {
            let row = &block[k * BLOCK..(k + 1) * BLOCK];
            for (a, &y) in acc.iter_mut().zip(row) {
                *a = if FMA { xv.mul_add(y, *a) } else { xv * y + *a };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn scores_fma(x: &[f32], block: &[f32], d: usize, out: &mut [[f32; BLOCK]; MR]) {
    scores_body::<true>(x, block, d, out)
}

/// [`scores_body`] with the `MR x BLOCK` sums in 24 AVX-512 registers.
///
/// # Safety
/// The CPU runs AVX-512F and FMA; `x` holds `MR x d` values, `block` `d x BLOCK`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn scores_avx512(x: &[f32], block: &[f32], d: usize, out: &mut [[f32; BLOCK]; MR]) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); BLOCK / 16]; MR];
    let (xp, bp) = (x.as_ptr(), block.as_ptr());
    for k in 0..d {
        // SAFETY: k < d, so the row `k` of the block, BLOCK floats from
        // k * BLOCK, lies inside `block` (d * BLOCK floats).
        let y: [__m512; BLOCK / 16] =
            std::array::from_fn(|i| unsafe { _mm512_loadu_ps(bp.add(k * BLOCK + 16 * i)) });
        for (q, a) in acc.iter_mut().enumerate() {
            // SAFETY: q < MR and k < d: inside `x` (MR * d floats).
            let xv = _mm512_set1_ps(unsafe { *xp.add(q * d + k) });
            for (ai, &yi) in a.iter_mut().zip(&y) {
                *ai = _mm512_fmadd_ps(xv, yi, *ai);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        for (i, &v) in a.iter().enumerate() {
            // SAFETY: 16 floats at 16 i < BLOCK inside the row of `out`.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(16 * i), v) };
        }
    }
}

/// The relative bound on how far a computed score may lie above `‖q‖ ‖y‖`:
/// `d` rounded multiply-adds (plus slack for the norms), doubled.
fn widening(d: usize) -> f64 {
    let u = (d as f64 + 4.0) * f64::from(f32::EPSILON) / 2.0;
    1.0 + 2.0 * u / (1.0 - u)
}

/// Per-task buffers of [`top_n`].
struct Scratch {
    x: Vec<f32>,
    scores: [[f32; BLOCK]; MR],
    selections: Vec<Selection>,
    norms: Vec<f64>,
}

/// Offers the scores of one query against one block (`slots`: their items) that
/// reach its bar, but the excluded items (`skip`, sorted). Runs of 16 scores below
/// the bar are passed over with one vector compare.
#[inline(always)]
fn offer_block(sel: &mut Selection, scores: &[f32; BLOCK], slots: &[u32], skip: &[u32]) {
    const RUN: usize = 16;
    for (run, chunk) in scores.chunks_exact(RUN).enumerate() {
        // NaN never reaches a bar; without one everything is offered
        let t = sel.threshold();
        if sel.bar.is_some() && !chunk.iter().fold(false, |any, &v| any | (v >= t)) {
            continue;
        }
        for (j, &score) in chunk.iter().enumerate() {
            let t = sel.threshold();
            if sel.bar.is_some() && (score.is_nan() || score < t) {
                continue;
            }
            let item = slots[run * RUN + j];
            if item == NO_ITEM || skip.binary_search(&item).is_ok() {
                continue;
            }
            sel.offer(Candidate { score, item });
        }
    }
}

/// Scores the queries of `tile` (rows `first..`) and writes their lists. At
/// every block the queries still scanning are taken [`MR`] at a time, so a
/// query that has stopped costs nothing while the others go on.
#[allow(clippy::too_many_arguments)]
fn top_n_tile(
    tile: &[f32],
    first: usize,
    items: &Items,
    d: usize,
    exclude: Option<&Csr>,
    kernel: Kernel,
    prune: bool,
    scratch: &mut Scratch,
    out: (&mut [u32], &mut [f32]),
) -> usize {
    let m = tile.len() / d;
    let n = scratch.selections[0].n;
    let widen = widening(d);
    for (q, row) in tile.chunks_exact(d).enumerate() {
        scratch.selections[q].reset();
        scratch.norms[q] = norm(row);
    }
    let mut live: Vec<usize> = (0..m).collect();
    let mut scored = 0;
    for (b, block) in items.blocks.chunks_exact(BLOCK * d).enumerate() {
        if prune {
            let bound = items.block_norm[b] * widen;
            live.retain(|&q| {
                scratch.norms[q] * bound >= f64::from(scratch.selections[q].threshold())
            });
        }
        if live.is_empty() {
            break;
        }
        let slots = &items.order[b * BLOCK..(b + 1) * BLOCK];
        for group in live.chunks(MR) {
            // the group's queries, zero rows after the last
            let x = &mut scratch.x;
            for (r, &q) in group.iter().enumerate() {
                x[r * d..(r + 1) * d].copy_from_slice(&tile[q * d..(q + 1) * d]);
            }
            x[group.len() * d..].fill(0.0);
            kernel.scores(x, block, d, &mut scratch.scores);
            scored += 1;
            for (r, &q) in group.iter().enumerate() {
                let sel = &mut scratch.selections[q];
                let skip: &[u32] = exclude.map_or(&[], |e| e.row(first + q).0);
                offer_block(sel, &scratch.scores[r], slots, skip);
                sel.tighten();
            }
        }
    }
    let (items_out, scores_out) = out;
    for q in 0..m {
        scratch.selections[q].finish(
            &mut items_out[q * n..(q + 1) * n],
            &mut scores_out[q * n..(q + 1) * n],
        );
    }
    scored
}

/// The best `n` rows of `items` for every row of `queries` (both row-major with
/// `d` features), skipping the columns of each query's row of `exclude`. See
/// [`crate::Backend::top_n`].
pub(crate) fn top_n(
    queries: &[f32],
    items: &[f32],
    d: usize,
    items_d: usize,
    n: usize,
    exclude: Option<&Csr>,
) -> Result<TopN, KernelError> {
    top_n_with(queries, items, d, items_d, n, exclude, Kernel::best(), true).map(|(t, _)| t)
}

/// [`top_n`] with the kernel and the pruning chosen; also returns the query
/// groups times blocks scored (for the tests and the trace).
#[allow(clippy::too_many_arguments)]
pub(crate) fn top_n_with(
    queries: &[f32],
    items: &[f32],
    d: usize,
    items_d: usize,
    n: usize,
    exclude: Option<&Csr>,
    kernel: Kernel,
    prune: bool,
) -> Result<(TopN, usize), KernelError> {
    if items_d != d {
        return Err(KernelError::Shape(format!(
            "the queries have {d} features per row but the items have {items_d}"
        )));
    }
    let (q_n, i_n) = (queries.len() / d, items.len() / d);
    if i_n >= NO_ITEM as usize {
        return Err(KernelError::Shape(format!(
            "{i_n} items do not fit 32-bit item indices"
        )));
    }
    if let Some(ex) = exclude
        && (ex.rows != q_n || ex.cols != i_n)
    {
        return Err(KernelError::Shape(format!(
            "the exclusion matrix is {} x {} but there are {q_n} queries and {i_n} items",
            ex.rows, ex.cols
        )));
    }
    let Some(slots) = q_n.checked_mul(n) else {
        return Err(KernelError::Shape(format!(
            "{q_n} queries x {n} results overflow"
        )));
    };
    let mut out = TopN {
        n,
        items: vec![NO_ITEM; slots],
        scores: vec![f32::NEG_INFINITY; slots],
    };
    if slots == 0 || i_n == 0 {
        return Ok((out, 0));
    }
    let prepared = Items::new(items, d);
    let scored: usize = out
        .items
        .par_chunks_mut(TILE * n)
        .zip(out.scores.par_chunks_mut(TILE * n))
        .zip(queries.par_chunks(TILE * d))
        .enumerate()
        .map_init(
            || Scratch {
                x: vec![0.0; MR * d],
                scores: [[0.0; BLOCK]; MR],
                selections: (0..TILE).map(|_| Selection::new(n, i_n)).collect(),
                norms: vec![0.0; TILE],
            },
            |scratch, (t, ((items_out, scores_out), tile))| {
                top_n_tile(
                    tile,
                    t * TILE,
                    &prepared,
                    d,
                    exclude,
                    kernel,
                    prune,
                    scratch,
                    (items_out, scores_out),
                )
            },
        )
        .sum();
    let full = q_n.div_ceil(MR) * prepared.block_norm.len();
    tracing::trace!(
        queries = q_n,
        items = i_n,
        d,
        n,
        scored,
        full,
        "top-n on the cpu backend"
    );
    Ok((out, scored))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testing::{Rng, bits};
    use crate::{Backend, CpuBackend, reference};

    /// Every backend the tests run on (one test body, every backend).
    fn backends() -> Vec<Box<dyn Backend>> {
        vec![Box::new(CpuBackend::new())]
    }

    fn top_n_on(
        backend: &dyn Backend,
        queries: &[f32],
        items: &[f32],
        d: usize,
        n: usize,
        exclude: Option<&Csr>,
    ) -> TopN {
        let q = backend.upload(queries, d).unwrap();
        let i = backend.upload(items, d).unwrap();
        let e = exclude.map(|e| backend.upload_sparse(e).unwrap());
        backend.top_n(&q, &i, n, e.as_ref()).unwrap()
    }

    // -----------------------------------------------------------------------
    // top_n

    /// Checks a backend's top-N against the reference's: the same scores slot by
    /// slot within `tol`, items that differ only on a near-tie, no excluded or
    /// repeated items.
    fn check_top_n(
        queries: &[f32],
        items: &[f32],
        d: usize,
        n: usize,
        exclude: Option<&Csr>,
        got: &TopN,
        what: &str,
    ) {
        let want = reference::top_n(queries, items, d, n, exclude);
        let tol = 1e-5 * d as f32;
        assert_eq!(got.n, n, "{what}");
        assert_eq!(got.items.len(), want.items.len(), "{what}");
        assert_eq!(got.scores.len(), want.scores.len(), "{what}");
        for q in 0..queries.len() / d {
            let ctx = || {
                format!(
                    "{what}: query {q}: got {:?} {:?}, reference {:?} {:?}",
                    &got.items[q * n..(q + 1) * n],
                    &got.scores[q * n..(q + 1) * n],
                    &want.items[q * n..(q + 1) * n],
                    &want.scores[q * n..(q + 1) * n]
                )
            };
            let skip: &[u32] = exclude.map_or(&[], |e| e.row(q).0);
            let mut seen = std::collections::HashSet::new();
            for s in q * n..(q + 1) * n {
                let (gi, gs, wi, ws) = (got.items[s], got.scores[s], want.items[s], want.scores[s]);
                if wi == NO_ITEM {
                    assert_eq!((gi, gs), (NO_ITEM, f32::NEG_INFINITY), "{}", ctx());
                    continue;
                }
                assert_ne!(gi, NO_ITEM, "{}", ctx());
                assert!(seen.insert(gi), "repeated item: {}", ctx());
                assert!(!skip.contains(&gi), "excluded item: {}", ctx());
                assert!((gs - ws).abs() <= tol, "score differs: {}", ctx());
                if gi != wi {
                    let query = &queries[q * d..(q + 1) * d];
                    let item = &items[gi as usize * d..(gi as usize + 1) * d];
                    let ref_score: f32 = query.iter().zip(item).map(|(a, b)| a * b).sum();
                    assert!(
                        (ref_score - ws).abs() <= tol,
                        "item differs without a near-tie: {}",
                        ctx()
                    );
                }
            }
        }
    }

    #[test]
    fn top_n_matches_reference() {
        let mut rng = Rng(108);
        for backend in backends() {
            for &(queries, items) in &[(1, 1), (150, 700), (TILE + 1, 3 * BLOCK + 5)] {
                for &d in &[1, 3, 16, 40] {
                    for &n in &[1, 5, 50] {
                        let q = rng.values(queries * d, 1.0);
                        let i = rng.values(items * d, 1.0);
                        let what = format!("{queries} x {items}, d={d}, n={n}");
                        let got = top_n_on(&*backend, &q, &i, d, n, None);
                        check_top_n(&q, &i, d, n, None, &got, &what);
                        let ex = rng.csr(queries, items, 0.1, |_| 1.0);
                        let got = top_n_on(&*backend, &q, &i, d, n, Some(&ex));
                        check_top_n(&q, &i, d, n, Some(&ex), &got, &format!("{what}, excluding"));
                    }
                }
            }
        }
    }

    #[test]
    fn top_n_ties_go_to_the_lower_index() {
        let mut rng = Rng(109);
        for backend in backends() {
            // Integer features: scores are exact, many are equal, and the result
            // must be the reference's to the bit.
            let (queries, items, d) = (130, 600, 8);
            let q = rng.integers(queries * d);
            let i = rng.integers(items * d);
            for &n in &[1, 7, 100] {
                let got = top_n_on(&*backend, &q, &i, d, n, None);
                let want = reference::top_n(&q, &i, d, n, None);
                assert_eq!(got.items, want.items, "n={n}");
                assert_eq!(bits(&got.scores), bits(&want.scores), "n={n}");
                for (slots, scores) in got.items.chunks(n).zip(got.scores.chunks(n)) {
                    for s in 1..n {
                        assert!(
                            scores[s - 1] > scores[s]
                                || (scores[s - 1] == scores[s] && slots[s - 1] < slots[s]),
                            "{slots:?} {scores:?}"
                        );
                    }
                }
            }

            // Copies of one item: the lowest copies come first, in index order.
            let best = vec![1.0f32; d];
            let mut i = rng.values(500 * d, 0.1);
            for &j in &[480, 7, 300, 256, 255] {
                i[j * d..(j + 1) * d].copy_from_slice(&best);
            }
            let got = top_n_on(&*backend, &best, &i, d, 4, None);
            assert_eq!(got.items, vec![7, 255, 256, 300]);
            assert!(
                got.scores.iter().all(|&s| s == d as f32),
                "{:?}",
                got.scores
            );

            // A zero query scores every item 0: items 0, 1, 2, ...
            let got = top_n_on(&*backend, &vec![0.0; d], &i, d, 6, None);
            assert_eq!(got.items, vec![0, 1, 2, 3, 4, 5]);
        }
    }

    #[test]
    fn top_n_honours_exclusions() {
        let mut rng = Rng(110);
        for backend in backends() {
            let (queries, items, d, n) = (70, 300, 6, 10);
            let q = rng.integers(queries * d);
            let i = rng.integers(items * d);
            let plain = reference::top_n(&q, &i, d, n, None);
            // Exclude each query's three best; the last query excludes everything.
            let mut ex = Csr {
                rows: queries,
                cols: items,
                indptr: vec![0],
                indices: Vec::new(),
                values: Vec::new(),
            };
            for r in 0..queries {
                if r == queries - 1 {
                    ex.indices.extend(0..items as u32);
                } else {
                    let mut best = plain.items[r * n..r * n + 3].to_vec();
                    best.sort_unstable();
                    ex.indices.extend(best);
                }
                ex.indptr.push(ex.indices.len() as u64);
            }
            ex.values = vec![1.0; ex.indices.len()];

            let got = top_n_on(&*backend, &q, &i, d, n, Some(&ex));
            let want = reference::top_n(&q, &i, d, n, Some(&ex));
            assert_eq!(got.items, want.items);
            assert_eq!(bits(&got.scores), bits(&want.scores));
            for r in 0..queries - 1 {
                // What is left is the unexcluded list, moved up three places.
                assert_eq!(
                    &got.items[r * n..r * n + n - 3],
                    &plain.items[r * n + 3..r * n + n]
                );
            }
            let last = &got.items[(queries - 1) * n..];
            assert!(last.iter().all(|&j| j == NO_ITEM), "{last:?}");
        }
    }

    #[test]
    fn top_n_fills_empty_slots_when_n_exceeds_the_items() {
        let mut rng = Rng(111);
        for backend in backends() {
            let d = 4;
            let q = rng.values(3 * d, 1.0);
            let i = rng.values(5 * d, 1.0);
            let got = top_n_on(&*backend, &q, &i, d, 8, None);
            check_top_n(&q, &i, d, 8, None, &got, "n > items");
            for r in 0..3 {
                let mut filled = got.items[r * 8..r * 8 + 5].to_vec();
                filled.sort_unstable();
                assert_eq!(filled, vec![0, 1, 2, 3, 4]);
                assert!(
                    got.items[r * 8 + 5..r * 8 + 8]
                        .iter()
                        .all(|&j| j == NO_ITEM)
                );
                assert!(
                    got.scores[r * 8 + 5..r * 8 + 8]
                        .iter()
                        .all(|&s| s == f32::NEG_INFINITY)
                );
            }
            // With two items excluded from query 1, three are left there.
            let ex = Csr {
                rows: 3,
                cols: 5,
                indptr: vec![0, 0, 2, 2],
                indices: vec![1, 4],
                values: vec![1.0, 1.0],
            };
            let got = top_n_on(&*backend, &q, &i, d, 8, Some(&ex));
            check_top_n(&q, &i, d, 8, Some(&ex), &got, "n > items, excluding");
            assert_eq!(
                got.items[8..16].iter().filter(|&&j| j != NO_ITEM).count(),
                3
            );

            // No items at all, and n = 0.
            let none = top_n_on(&*backend, &q, &[], d, 2, None);
            assert_eq!(none.items, vec![NO_ITEM; 6]);
            assert_eq!(none.scores, vec![f32::NEG_INFINITY; 6]);
            let zero = top_n_on(&*backend, &q, &i, d, 0, None);
            assert_eq!((zero.n, zero.items.len(), zero.scores.len()), (0, 0, 0));
        }
    }

    /// Items like ALS factors: a few long (popular) ones, most short.
    fn skewed_items(rng: &mut Rng, items: usize, d: usize) -> Vec<f32> {
        let mut v = rng.values(items * d, 1.0);
        for (j, row) in v.chunks_exact_mut(d).enumerate() {
            let scale = 1.0 / (1.0 + (j % 97) as f32);
            row.iter_mut().for_each(|x| *x *= scale);
        }
        v
    }

    #[test]
    fn pruning_skips_blocks_and_returns_the_lists_of_scoring_every_item() {
        let mut rng = Rng(121);
        let (queries, items) = (3 * TILE + 7, 20 * BLOCK + 13);
        for d in [1, 7, 32, 33] {
            let q = rng.values(queries * d, 1.0);
            let i = skewed_items(&mut rng, items, d);
            let ex = rng.csr(queries, items, 0.02, |_| 1.0);
            for kernel in Kernel::available() {
                for &n in &[1, 10, 100] {
                    for exclude in [None, Some(&ex)] {
                        let (full, all) =
                            top_n_with(&q, &i, d, d, n, exclude, kernel, false).unwrap();
                        let (pruned, some) =
                            top_n_with(&q, &i, d, d, n, exclude, kernel, true).unwrap();
                        let what =
                            format!("d={d} n={n} {kernel:?} excluding={}", exclude.is_some());
                        assert_eq!(pruned.items, full.items, "{what}");
                        assert_eq!(bits(&pruned.scores), bits(&full.scores), "{what}");
                        assert_eq!(all, queries.div_ceil(MR) * items.div_ceil(BLOCK));
                        if n <= 10 && d > 1 {
                            assert!(some < all / 2, "{what}: {some} of {all} scored");
                        }
                        assert!(some <= all);
                        check_top_n(&q, &i, d, n, exclude, &pruned, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn every_kernel_gives_the_same_scores() {
        let mut rng = Rng(122);
        let (queries, items, d, n) = (2 * TILE, 5 * BLOCK, 32, 20);
        let q = rng.values(queries * d, 1.0);
        let i = rng.values(items * d, 1.0);
        let fused: Vec<TopN> = Kernel::available()
            .into_iter()
            .filter(|&k| k != Kernel::Portable)
            .map(|k| top_n_with(&q, &i, d, d, n, None, k, true).unwrap().0)
            .collect();
        for t in &fused[1..] {
            assert_eq!(t.items, fused[0].items);
            assert_eq!(bits(&t.scores), bits(&fused[0].scores));
        }
        // and the score of a slot is the plain chain of fused multiply-adds
        if !fused.is_empty() {
            let t = &fused[0];
            for qi in [0, 17, queries - 1] {
                for slot in 0..n {
                    let item = t.items[qi * n + slot] as usize;
                    let want = q[qi * d..(qi + 1) * d]
                        .iter()
                        .zip(&i[item * d..(item + 1) * d])
                        .fold(0.0f32, |acc, (a, b)| a.mul_add(*b, acc));
                    assert_eq!(t.scores[qi * n + slot].to_bits(), want.to_bits());
                }
            }
        }
    }
}
