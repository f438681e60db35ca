//! Top-N recommendations on the CPU: fixed tiles of [`TOPN_QUERY_TILE`] queries
//! are scored against blocks of [`TOPN_ITEM_BLOCK`] items with one `sgemm` each,
//! and the best `n` per query are kept in a buffer of `2n` candidates that is cut
//! back to the best `n` whenever it fills (amortised O(1) per item whatever `n`
//! is).

use std::cmp::Ordering;

use rayon::prelude::*;

use crate::{Csr, KernelError, NO_ITEM, TopN};

/// Queries per parallel work item of [`top_n`].
pub(crate) const TOPN_QUERY_TILE: usize = 64;
/// Items per `sgemm` of [`top_n`]: the `TOPN_QUERY_TILE x TOPN_ITEM_BLOCK` scores
/// (64 KiB) stay in cache while they are offered to the selections.
pub(crate) const TOPN_ITEM_BLOCK: usize = 256;

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
/// a new candidate has to beat.
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

    /// Offers `scores[j]` as item `first_item + j` for every `j`. The items must
    /// come after every item offered before, so that a score equal to the bar's
    /// loses the tie: while there is a bar, only scores above it are offered, and
    /// runs of scores that are not are skipped 16 at a time.
    #[inline(always)]
    fn offer_row(&mut self, scores: &[f32], first_item: u32) {
        const RUN: usize = 16;
        let mut j = 0;
        while j < scores.len() {
            if let Some(bar) = self.bar {
                // NaN ranks as -inf: never above the bar
                let t = rank(bar.score);
                let above = |v: f32| v > t;
                while j + RUN <= scores.len()
                    && !scores[j..j + RUN]
                        .iter()
                        .fold(false, |any, &v| any | above(v))
                {
                    j += RUN;
                }
                while j < scores.len() && !above(scores[j]) {
                    j += 1;
                }
                if j == scores.len() {
                    break;
                }
            }
            self.offer(Candidate {
                score: scores[j],
                item: first_item + j as u32,
            });
            j += 1;
        }
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

/// Per-task buffers of [`top_n`].
struct TopNScratch {
    /// Scores of a tile against a block of items, `TOPN_QUERY_TILE x TOPN_ITEM_BLOCK`.
    dots: Vec<f32>,
    selections: Vec<Selection>,
    /// Per query, the position reached in its exclusion list.
    cursors: Vec<usize>,
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
    tracing::trace!(queries = q_n, items = i_n, d, n, "top-n on the cpu backend");
    let mut out = TopN {
        n,
        items: vec![NO_ITEM; slots],
        scores: vec![f32::NEG_INFINITY; slots],
    };
    if slots == 0 {
        return Ok(out);
    }

    out.items
        .par_chunks_mut(TOPN_QUERY_TILE * n)
        .zip(out.scores.par_chunks_mut(TOPN_QUERY_TILE * n))
        .zip(queries.par_chunks(TOPN_QUERY_TILE * d))
        .enumerate()
        .for_each_init(
            || TopNScratch {
                dots: vec![0.0; TOPN_QUERY_TILE * TOPN_ITEM_BLOCK],
                selections: (0..TOPN_QUERY_TILE)
                    .map(|_| Selection::new(n, i_n))
                    .collect(),
                cursors: vec![0; TOPN_QUERY_TILE],
            },
            |scratch, (t, ((out_items, out_scores), tile))| {
                let first_query = t * TOPN_QUERY_TILE;
                top_n_tile(tile, first_query, items, d, exclude, scratch);
                let m = tile.len() / d;
                for q in 0..m {
                    scratch.selections[q].finish(
                        &mut out_items[q * n..(q + 1) * n],
                        &mut out_scores[q * n..(q + 1) * n],
                    );
                }
            },
        );
    Ok(out)
}

/// Offers every item to the selections of the queries of `tile`.
fn top_n_tile(
    tile: &[f32],
    first_query: usize,
    items: &[f32],
    d: usize,
    exclude: Option<&Csr>,
    scratch: &mut TopNScratch,
) {
    let m = tile.len() / d;
    for s in &mut scratch.selections[..m] {
        s.reset();
    }
    scratch.cursors[..m].fill(0);

    for (b, block) in items.chunks(TOPN_ITEM_BLOCK * d).enumerate() {
        let first_item = b * TOPN_ITEM_BLOCK;
        let nb = block.len() / d;
        let dots = &mut scratch.dots[..m * nb];
        // SAFETY: sgemm reads A = `tile` as m x d with strides (d, 1): its last
        // element is at (m-1)*d + d-1 < tile.len() = m*d. It reads B as the d x nb
        // matrix whose column j is item `first_item + j` of `block`, with strides
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
                tile.as_ptr(),
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
        let rows = dots.chunks_exact(nb).zip(&mut scratch.selections[..m]);
        match exclude {
            None => {
                for (scores, sel) in rows {
                    sel.offer_row(scores, first_item as u32);
                }
            }
            Some(ex) => {
                for (q, ((scores, sel), cursor)) in rows.zip(&mut scratch.cursors[..m]).enumerate()
                {
                    // Strictly increasing columns, and the items come in order: the
                    // runs between this block's excluded items are offered.
                    let skip = ex.row(first_query + q).0;
                    let mut j = 0;
                    while j < nb {
                        let next = match skip.get(*cursor) {
                            Some(&item) if (item as usize) < first_item + nb => {
                                item as usize - first_item
                            }
                            _ => nb,
                        };
                        sel.offer_row(&scores[j..next], (first_item + j) as u32);
                        if next < nb {
                            *cursor += 1;
                        }
                        j = next + 1;
                    }
                }
            }
        }
    }
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
            for &(queries, items) in &[(1, 1), (150, 700), (TOPN_QUERY_TILE, TOPN_ITEM_BLOCK)] {
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
}
