//! Implicit-feedback ALS on a worker: the pure parts. Which pairs are held out,
//! the initial factor rows, where the other side's rows live, the confidence
//! matrices, and the loss terms a worker reports.
//!
//! Both sides of a pair see the same strength: the load sums a pair's rows per
//! split in split order on the user side and on the item side alike, and the
//! same pairs are held out (`hash(seed, user key, item key)`) on both.
//!
//! Rows of a confidence matrix are ordered by (shard of the other side, position
//! in that shard): a global order (positions follow keys), so the solve of a row
//! sees its entries in the same order whichever worker holds it and however many
//! workers run.

use crate::WorkerError;
use crate::steps::load::Pairs;
use rayon::prelude::*;
use shoal_kernels::Csr;
use shoal_spec::hash::{self, shard_of_key};
use shoal_spec::spec::AlsSpec;
use std::collections::HashMap;
use std::sync::Arc;

/// Seed stream of the initial factors and the holdout draw.
const INIT_STREAM: u64 = 0xa15_0001;
const HOLDOUT_STREAM: u64 = 0xa15_0002;
/// Scale of the initial factors: uniform in `[0, INIT_SCALE)` (implicit's choice).
const INIT_SCALE: f64 = 0.01;

/// Which side of the factorisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Users,
    Items,
}

impl Side {
    pub fn to_proto(self) -> i32 {
        match self {
            Side::Users => shoal_proto::pb::AlsSide::Users as i32,
            Side::Items => shoal_proto::pb::AlsSide::Items as i32,
        }
    }

    pub fn from_proto(v: i32) -> Result<Side, WorkerError> {
        match shoal_proto::pb::AlsSide::try_from(v) {
            Ok(shoal_proto::pb::AlsSide::Users) => Ok(Side::Users),
            Ok(shoal_proto::pb::AlsSide::Items) => Ok(Side::Items),
            _ => Err(WorkerError::InvalidRequest(format!(
                "ALS side {v} is neither users nor items"
            ))),
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Users => Side::Items,
            Side::Items => Side::Users,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Users => "users",
            Side::Items => "items",
        }
    }
}

/// Whether the pair (user, item), by keys, is held out for evaluation.
pub fn held_out(seed: u64, share: f64, user: u64, item: u64) -> bool {
    share > 0.0 && hash::unit(hash::key(seed ^ HOLDOUT_STREAM, &[user, item])) < share
}

/// The initial factor row of the entity with key `key` on `side`.
pub fn initial_row(seed: u64, side: Side, key: u64, out: &mut [f32]) {
    let side = match side {
        Side::Users => 1,
        Side::Items => 2,
    };
    for (j, v) in out.iter_mut().enumerate() {
        *v =
            (hash::unit(hash::key(seed ^ INIT_STREAM, &[side, key, j as u64])) * INIT_SCALE) as f32;
    }
}

/// A worker's local space of the other side's rows: the sorted, distinct
/// (shard, position) it needs, and per shard the positions to fetch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Needed {
    /// Sorted, distinct.
    pub rows: Vec<(u32, u32)>,
}

impl Needed {
    pub fn new(mut rows: Vec<(u32, u32)>) -> Needed {
        rows.sort_unstable();
        rows.dedup();
        Needed { rows }
    }

    /// Local index of a (shard, position).
    pub fn index(&self, at: (u32, u32)) -> Option<u32> {
        self.rows.binary_search(&at).ok().map(|i| i as u32)
    }

    /// Per shard: the positions to fetch, and the local index of the first.
    pub fn by_shard(&self) -> Vec<(u32, Vec<u32>, u32)> {
        let mut out: Vec<(u32, Vec<u32>, u32)> = Vec::new();
        for (i, &(s, p)) in self.rows.iter().enumerate() {
            match out.last_mut() {
                Some((last, ps, _)) if *last == s => ps.push(p),
                _ => out.push((s, vec![p], i as u32)),
            }
        }
        out
    }
}

/// The key lists of the other side's shards (positions follow keys).
pub type KeyLists = HashMap<u32, Arc<Vec<u64>>>;

/// A shard's sorted key list with a table of where each range of high bits
/// starts: keys are hashes, spread evenly, so a key is found by one look into
/// the table and a scan of the few keys of its range (a binary search would
/// miss the cache a dozen times on a large shard).
pub struct KeyIndex {
    keys: Arc<Vec<u64>>,
    shift: u32,
    starts: Vec<u32>,
}

impl KeyIndex {
    pub fn new(keys: Arc<Vec<u64>>) -> KeyIndex {
        // about one key per range
        let bits = (usize::BITS - keys.len().max(1).leading_zeros()).clamp(1, 30);
        let shift = 64 - bits;
        let ranges = 1usize << bits;
        let mut starts = vec![0u32; ranges + 1];
        let mut at = 0usize;
        for (b, start) in starts.iter_mut().enumerate() {
            while at < keys.len() && ((keys[at] >> shift) as usize) < b {
                at += 1;
            }
            *start = at as u32;
        }
        KeyIndex {
            keys,
            shift,
            starts,
        }
    }

    /// The position of `key`, if the list holds it.
    pub fn position(&self, key: u64) -> Option<u32> {
        let b = (key >> self.shift) as usize;
        let (a, z) = (self.starts[b] as usize, self.starts[b + 1] as usize);
        self.keys[a..z]
            .iter()
            .position(|&k| k == key)
            .map(|p| (a + p) as u32)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The indexes of the other side's key lists, by shard.
pub type KeyIndexes = HashMap<u32, KeyIndex>;

/// Indexes of every list.
pub fn index_lists(lists: &KeyLists) -> KeyIndexes {
    lists
        .par_iter()
        .map(|(&s, l)| (s, KeyIndex::new(l.clone())))
        .collect()
}

/// Where the entity `key` lives: (its shard, its position there).
pub fn locate(
    job: &str,
    key: u64,
    shards: u32,
    lists: &KeyIndexes,
) -> Result<(u32, u32), WorkerError> {
    let s = shard_of_key(key, shards);
    let list = lists.get(&s).ok_or_else(|| WorkerError::Inconsistent {
        job: job.to_string(),
        detail: format!("no key list of shard {s} fetched"),
    })?;
    let pos = list
        .position(key)
        .ok_or_else(|| WorkerError::Inconsistent {
            job: job.to_string(),
            detail: format!(
                "key {key:#018x} is not among the {} keys of shard {s}",
                list.len()
            ),
        })?;
    Ok((s, pos))
}

/// The local space of the pairs of several shards of one side, and each shard's
/// entries as local columns (in the shards' order, entries in row order).
pub fn link_columns(
    job: &str,
    pairs: &[&Pairs],
    shards: u32,
    lists: &KeyIndexes,
) -> Result<(Needed, Vec<Vec<u32>>), WorkerError> {
    // every entry's (shard, position), shard by shard, rows in parallel
    let located: Vec<Vec<(u32, u32)>> = pairs
        .iter()
        .map(|p| {
            p.others
                .par_iter()
                .map(|&k| locate(job, k, shards, lists))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<_, _>>()?;
    // which positions of each shard are needed, then their local indices in
    // (shard, position) order; marks by shard index (a lookup per entry)
    let mut marks: Vec<Vec<u32>> = vec![Vec::new(); shards as usize];
    for (&s, l) in lists {
        if let Some(m) = marks.get_mut(s as usize) {
            *m = vec![0u32; l.len()];
        }
    }
    for &(s, p) in located.iter().flatten() {
        marks[s as usize][p as usize] = 1;
    }
    let mut rows = Vec::new();
    for (s, m) in marks.iter_mut().enumerate() {
        for (p, flag) in m.iter_mut().enumerate() {
            if *flag == 1 {
                *flag = rows.len() as u32 + 1;
                rows.push((s as u32, p as u32));
            }
        }
    }
    let cols = located
        .into_iter()
        .map(|l| {
            l.into_par_iter()
                .map(|(s, p)| marks[s as usize][p as usize] - 1)
                .collect()
        })
        .collect();
    Ok((Needed { rows }, cols))
}

/// The confidence matrix of `pairs` with its entries' local columns `cols`
/// (increasing within a row: the global order) and `width` columns.
pub fn confidence_matrix(pairs: &Pairs, cols: Vec<u32>, width: usize, als: &AlsSpec) -> Csr {
    let values = pairs
        .strength
        .iter()
        .map(|&s| als.confidence_of(s) as f32)
        .collect();
    Csr {
        rows: pairs.rows(),
        cols: width,
        indptr: pairs.indptr.clone(),
        indices: cols,
        values,
    }
}

/// The confidence matrix of `pairs` with `width` columns, where `column(k)` is the
/// column of the other entity with key `k`; pairs whose other has no column are
/// left out and counted (the second value). Each row's columns are sorted.
pub fn confidence_rows(
    pairs: &Pairs,
    column: impl Fn(u64) -> Option<u32>,
    width: usize,
    als: &AlsSpec,
) -> (Csr, u64) {
    let mut indptr = Vec::with_capacity(pairs.rows() + 1);
    let mut indices = Vec::with_capacity(pairs.nnz());
    let mut values = Vec::with_capacity(pairs.nnz());
    indptr.push(0u64);
    let mut unknown = 0u64;
    let mut row: Vec<(u32, f32)> = Vec::new();
    for r in 0..pairs.rows() {
        let (others, strength) = pairs.row(r);
        row.clear();
        for (&o, &s) in others.iter().zip(strength) {
            match column(o) {
                Some(c) => row.push((c, als.confidence_of(s) as f32)),
                None => unknown += 1,
            }
        }
        row.sort_unstable_by_key(|e| e.0);
        indices.extend(row.iter().map(|e| e.0));
        values.extend(row.iter().map(|e| e.1));
        indptr.push(indices.len() as u64);
    }
    let csr = Csr {
        rows: pairs.rows(),
        cols: width,
        indptr,
        indices,
        values,
    };
    (csr, unknown)
}

/// The data term of the objective over the rows of one shard:
/// `Σ_r [ x_rᵀ G x_r + Σ_{i ∈ row} (c_ri (1 − s)² − s²) ]` with `s = x_r · y_i`,
/// where `G` is the Gram matrix of every row of the other side (absent pairs have
/// confidence 1 and preference 0). `pair_loss` is the second sum (from
/// [`shoal_kernels::Backend::als_solve`]); `own_gram` is `XᵀX` of the shard's
/// rows, so the first sum is `Σ_ab G_ab (XᵀX)_ab`.
pub fn data_loss(pair_loss: f64, gram: &[f64], own_gram: &[f64]) -> f64 {
    let quad: f64 = gram.iter().zip(own_gram).map(|(a, b)| a * b).sum();
    quad + pair_loss
}

/// Sum of the confidences of every stored pair (the loss is normalised by it).
pub fn confidence_sum(conf: &Csr) -> f64 {
    conf.values.iter().map(|&c| f64::from(c)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AlsSpec {
        AlsSpec::default()
    }

    #[test]
    fn both_sides_hold_out_the_same_pairs_and_about_the_share_asked() {
        let mut n = 0;
        let mut held = 0;
        for u in 0..200u64 {
            for i in 0..50u64 {
                n += 1;
                let h = held_out(
                    3,
                    0.25,
                    hash::id_key(&u.to_string()),
                    hash::id_key(&i.to_string()),
                );
                held += u64::from(h);
            }
        }
        assert!(
            (held as f64 / n as f64 - 0.25).abs() < 0.03,
            "{held} of {n}"
        );
        assert!(!held_out(3, 0.0, 1, 2));
    }

    #[test]
    fn columns_follow_the_global_order_of_the_other_side() {
        let shards = 4;
        // the other side's shards and their sorted key lists
        let keys: Vec<u64> = (0..40).map(|i| hash::id_key(&format!("item{i}"))).collect();
        let mut lists: HashMap<u32, Vec<u64>> = HashMap::new();
        for &k in &keys {
            lists.entry(shard_of_key(k, shards)).or_default().push(k);
        }
        let lists: KeyLists = lists
            .into_iter()
            .map(|(s, mut l)| {
                l.sort_unstable();
                (s, Arc::new(l))
            })
            .collect();
        let mut row: Vec<u64> = vec![keys[3], keys[17], keys[29]];
        row.sort_by_key(|&k| (shard_of_key(k, shards), k));
        let mut row2: Vec<u64> = vec![keys[17], keys[5]];
        row2.sort_by_key(|&k| (shard_of_key(k, shards), k));
        let pairs = Pairs {
            indptr: vec![0, 3, 5],
            others: row.iter().chain(&row2).copied().collect(),
            strength: vec![1.0, 2.0, 3.0, 0.5, 1.0],
            held: Vec::new(),
            nonpositive: 0,
        };
        let lists = index_lists(&lists);
        let (needed, cols) = link_columns("j", &[&pairs], shards, &lists).unwrap();
        assert_eq!(needed.rows.len(), 4, "distinct rows needed");
        assert!(needed.rows.windows(2).all(|w| w[0] < w[1]));
        for (&k, &c) in pairs.others.iter().zip(&cols[0]) {
            assert_eq!(
                needed.rows[c as usize],
                locate("j", k, shards, &lists).unwrap()
            );
        }
        let m = confidence_matrix(&pairs, cols[0].clone(), needed.rows.len(), &spec());
        m.validate().unwrap();
        assert_eq!(m.values[0], 41.0);
        let err = locate("j", 12345, shards, &lists).unwrap_err().to_string();
        assert!(err.contains("is not among"), "{err}");
    }

    #[test]
    fn key_indexes_find_every_key_and_no_other() {
        for n in [0usize, 1, 2, 7, 1000, 65_537] {
            let mut keys: Vec<u64> = (0..n as u64).map(|i| hash::key(9, &[i])).collect();
            keys.sort_unstable();
            let index = KeyIndex::new(Arc::new(keys.clone()));
            for (p, &k) in keys.iter().enumerate() {
                assert_eq!(index.position(k), Some(p as u32));
            }
            for i in 0..100u64 {
                let other = hash::key(10, &[i]);
                assert_eq!(
                    index.position(other),
                    keys.binary_search(&other).ok().map(|p| p as u32)
                );
            }
            assert_eq!(
                index.position(u64::MAX),
                keys.binary_search(&u64::MAX).ok().map(|p| p as u32)
            );
            assert_eq!(
                index.position(0),
                keys.binary_search(&0).ok().map(|p| p as u32)
            );
        }
    }

    #[test]
    fn needed_rows_group_by_shard() {
        let needed = Needed::new(vec![(3, 0), (1, 5), (1, 2)]);
        assert_eq!(needed.by_shard(), vec![(1, vec![2, 5], 0), (3, vec![0], 2)]);
        assert_eq!(needed.index((1, 5)), Some(1));
    }

    #[test]
    fn data_loss_matches_the_dense_objective() {
        // 2 users x 3 items, f = 2: compare with the sum over every cell.
        let f = 2;
        let x = [0.3f32, -0.2, 0.5, 0.1];
        let y = [0.2f32, 0.4, -0.3, 0.6, 0.1, 0.1];
        let conf = Csr {
            rows: 2,
            cols: 3,
            indptr: vec![0, 2, 3],
            indices: vec![0, 2, 1],
            values: vec![3.0, 5.0, 2.0],
        };
        let mut gram = vec![0.0f64; 4];
        for i in 0..3 {
            for a in 0..2 {
                for b in 0..2 {
                    gram[a * 2 + b] += f64::from(y[i * 2 + a]) * f64::from(y[i * 2 + b]);
                }
            }
        }
        let mut dense = 0.0f64;
        for u in 0..2 {
            for i in 0..3 {
                let s: f64 = (0..2)
                    .map(|j| f64::from(x[u * 2 + j]) * f64::from(y[i * 2 + j]))
                    .sum();
                let (c, p) = match (u, i) {
                    (0, 0) => (3.0, 1.0),
                    (0, 2) => (5.0, 1.0),
                    (1, 1) => (2.0, 1.0),
                    _ => (1.0, 0.0),
                };
                dense += c * (p - s) * (p - s);
            }
        }
        let mut own = vec![0.0f64; 4];
        for u in 0..2 {
            for a in 0..2 {
                for b in 0..2 {
                    own[a * 2 + b] += f64::from(x[u * 2 + a]) * f64::from(x[u * 2 + b]);
                }
            }
        }
        // the pair terms as the item half-step gets them: a solve with no CG step
        use shoal_kernels::Backend;
        let backend = shoal_kernels::CpuBackend::new();
        let mut xr = backend.upload(&x, f).unwrap();
        let yr = backend.upload(&y, f).unwrap();
        let cr = backend.upload_sparse(&conf).unwrap();
        let params = shoal_kernels::CgParams {
            regularization: 0.1,
            cg_steps: 0,
            pair_loss: true,
        };
        let pairs = backend.als_solve(&mut xr, &yr, &gram, &cr, params).unwrap();
        let got = data_loss(pairs.unwrap(), &gram, &own);
        assert!((got - dense).abs() < 1e-6, "{got} vs {dense}");
    }

    #[test]
    fn initial_rows_depend_on_the_key_only() {
        let mut a = [0f32; 8];
        let mut b = [0f32; 8];
        initial_row(5, Side::Users, 17850, &mut a);
        initial_row(5, Side::Users, 17850, &mut b);
        assert_eq!(a, b);
        initial_row(5, Side::Items, 17850, &mut b);
        assert_ne!(a, b);
        assert!(a.iter().all(|v| (0.0..0.01).contains(v)));
    }
}
