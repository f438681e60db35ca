//! Implicit-feedback ALS on a worker: the (user, item) strengths of its shards, the
//! confidence matrices built once the other side's id lists are known, the factor
//! rows it owns and the loss terms it reports.
//!
//! Both sides of a pair see the same rows: ingest routes every row with an item to
//! its user shard and to its item shard, in split order, so the strength of a pair
//! (the sum of `weight * quantity` over its rows) is summed in the same order, and
//! the same pairs are held out (`hash(seed, user, item)`), on both sides.
//!
//! Rows of a confidence matrix are ordered by (shard of the other side, position in
//! that shard's sorted id list), a global order, so the solve of a row sees its
//! entries in the same order whichever worker holds it and however many workers run.

use crate::WorkerError;
use arrow::array::{Array, Float64Array, StringArray};
use arrow::record_batch::RecordBatch;
use shoal_kernels::Csr;
use shoal_proto::hash;
use shoal_proto::spec::AlsSpec;
use std::collections::HashMap;

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

/// Whether the pair (user, item) is held out for evaluation.
pub fn held_out(seed: u64, share: f64, user: &str, item: &str) -> bool {
    share > 0.0
        && hash::unit(hash::key(
            seed ^ HOLDOUT_STREAM,
            &[hash::key_str(seed, user), hash::key_str(seed, item)],
        )) < share
}

/// The initial factor row of the entity `id` on `side`.
pub fn initial_row(seed: u64, side: Side, id: &str, out: &mut [f32]) {
    let base = hash::key_str(seed ^ INIT_STREAM, id);
    let side = match side {
        Side::Users => 1,
        Side::Items => 2,
    };
    for (j, v) in out.iter_mut().enumerate() {
        *v = (hash::unit(hash::key(seed ^ INIT_STREAM, &[side, base, j as u64])) * INIT_SCALE)
            as f32;
    }
}

/// What a shard's rows say about one side: its entities and, per entity, the
/// strengths of its pairs with the other side's entities.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pairs {
    /// This side's ids, sorted: row `r` of the tables below.
    pub ids: Vec<String>,
    /// The other side's ids that appear in a training pair, sorted.
    pub others: Vec<String>,
    /// `ids.len() + 1` offsets into `cols` / `strength`.
    pub indptr: Vec<u64>,
    /// Index into `others`, increasing within a row.
    pub cols: Vec<u32>,
    pub strength: Vec<f64>,
    /// Held-out pairs (row, other id), by row then id: the user side keeps them for
    /// evaluation.
    pub held: Vec<(u32, String)>,
    /// Pairs whose summed strength is not positive (dropped: no preference).
    pub nonpositive: u64,
    /// User side: the label of each item the shard's rows name (the first
    /// non-empty one in row order), when the spec names a label column.
    pub labels: HashMap<String, String>,
}

impl Pairs {
    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    pub fn nnz(&self) -> usize {
        self.cols.len()
    }

    /// The row of `r`: (indices into `others`, strengths).
    pub fn row(&self, r: usize) -> (&[u32], &[f64]) {
        let (a, b) = (self.indptr[r] as usize, self.indptr[r + 1] as usize);
        (&self.cols[a..b], &self.strength[a..b])
    }
}

fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &str,
    what: &str,
) -> Result<&'a T, WorkerError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            WorkerError::InvalidRequest(format!(
                "staged {what} batch lacks column `{name}` of the expected type"
            ))
        })
}

/// Sums the strengths of every (own, other) pair in the order the entries come,
/// drops pairs that are not positive, holds out the drawn ones, and builds the
/// table. `own_ids`: the rows to use (sorted, every entry's own id among them), or
/// `None` for the distinct own ids of the entries. `user_is_own` says which of the
/// two ids is the user's, for the holdout draw.
pub fn build_pairs<'a>(
    entries: impl Iterator<Item = (&'a str, &'a str, f64)>,
    own_ids: Option<Vec<String>>,
    user_is_own: bool,
    seed: u64,
    holdout: f64,
) -> Result<Pairs, WorkerError> {
    let mut own_index: HashMap<String, u32> = HashMap::new();
    let mut own_list: Vec<String> = Vec::new();
    let fixed = own_ids.is_some();
    if let Some(ids) = own_ids {
        for (i, id) in ids.iter().enumerate() {
            own_index.insert(id.clone(), i as u32);
        }
        own_list = ids;
    }
    let mut other_index: HashMap<String, u32> = HashMap::new();
    let mut other_list: Vec<String> = Vec::new();
    let mut sums: HashMap<(u32, u32), f64> = HashMap::new();
    for (own, other, s) in entries {
        let o = match own_index.get(own) {
            Some(&o) => o,
            None if fixed => {
                return Err(WorkerError::InvalidRequest(format!(
                    "staged pair names `{own}`, which the shard's rows do not hold"
                )));
            }
            None => {
                let o = own_list.len() as u32;
                own_index.insert(own.to_string(), o);
                own_list.push(own.to_string());
                o
            }
        };
        let t = match other_index.get(other) {
            Some(&t) => t,
            None => {
                let t = other_list.len() as u32;
                other_index.insert(other.to_string(), t);
                other_list.push(other.to_string());
                t
            }
        };
        *sums.entry((o, t)).or_insert(0.0) += s;
    }
    // Rows sorted by own id.
    let mut own_order: Vec<u32> = (0..own_list.len() as u32).collect();
    if !fixed {
        own_order.sort_by(|&a, &b| own_list[a as usize].cmp(&own_list[b as usize]));
    }
    let mut own_row = vec![0u32; own_list.len()];
    for (r, &o) in own_order.iter().enumerate() {
        own_row[o as usize] = r as u32;
    }
    let mut kept: Vec<(u32, u32, f64)> = Vec::with_capacity(sums.len());
    let mut held: Vec<(u32, String)> = Vec::new();
    let mut nonpositive = 0u64;
    for ((o, t), s) in sums {
        let (own, other) = (&own_list[o as usize], &other_list[t as usize]);
        if !(s > 0.0 && s.is_finite()) {
            nonpositive += 1;
            continue;
        }
        let (user, item) = if user_is_own {
            (own, other)
        } else {
            (other, own)
        };
        if held_out(seed, holdout, user, item) {
            held.push((own_row[o as usize], other.clone()));
            continue;
        }
        kept.push((own_row[o as usize], t, s));
    }
    // The other side's ids that stay, sorted.
    let mut used = vec![false; other_list.len()];
    for &(_, t, _) in &kept {
        used[t as usize] = true;
    }
    let mut others: Vec<u32> = (0..other_list.len() as u32)
        .filter(|&t| used[t as usize])
        .collect();
    others.sort_by(|&a, &b| other_list[a as usize].cmp(&other_list[b as usize]));
    let mut other_pos = vec![u32::MAX; other_list.len()];
    for (p, &t) in others.iter().enumerate() {
        other_pos[t as usize] = p as u32;
    }
    let mut kept: Vec<(u32, u32, f64)> = kept
        .into_iter()
        .map(|(r, t, s)| (r, other_pos[t as usize], s))
        .collect();
    kept.sort_unstable_by_key(|&(r, c, _)| (r, c));
    held.sort_unstable();
    let rows = own_list.len();
    let mut indptr = vec![0u64; rows + 1];
    for &(r, _, _) in &kept {
        indptr[r as usize + 1] += 1;
    }
    for r in 0..rows {
        indptr[r + 1] += indptr[r];
    }
    let ids: Vec<String> = own_order
        .iter()
        .map(|&o| own_list[o as usize].clone())
        .collect();
    Ok(Pairs {
        ids,
        others: others
            .into_iter()
            .map(|t| other_list[t as usize].clone())
            .collect(),
        indptr,
        cols: kept.iter().map(|k| k.1).collect(),
        strength: kept.iter().map(|k| k.2).collect(),
        held,
        nonpositive,
        labels: HashMap::new(),
    })
}

/// The user side of a user shard: from its staged rows (user, item, weight,
/// quantity) and its users (sorted, as the RFM table holds them).
pub fn user_pairs(
    batches: &[RecordBatch],
    users: &[String],
    seed: u64,
    holdout: f64,
) -> Result<Pairs, WorkerError> {
    use crate::staging::{ITEM, ITEM_LABEL, QUANTITY, USER, WEIGHT};
    let mut labels: HashMap<String, String> = HashMap::new();
    for b in batches {
        let item = column::<StringArray>(b, ITEM, "user-shard")?;
        let label = column::<StringArray>(b, ITEM_LABEL, "user-shard")?;
        if label.null_count() == label.len() {
            continue;
        }
        for r in 0..b.num_rows() {
            if item.is_valid(r) && label.is_valid(r) && !label.value(r).trim().is_empty() {
                labels
                    .entry(item.value(r).to_string())
                    .or_insert_with(|| label.value(r).trim().to_string());
            }
        }
    }
    let mut cols = Vec::with_capacity(batches.len());
    for b in batches {
        cols.push((
            column::<StringArray>(b, USER, "user-shard")?,
            column::<StringArray>(b, ITEM, "user-shard")?,
            column::<Float64Array>(b, WEIGHT, "user-shard")?,
            column::<Float64Array>(b, QUANTITY, "user-shard")?,
        ));
    }
    let entries = cols.into_iter().flat_map(|(u, i, w, q)| {
        (0..u.len())
            .filter(move |&r| i.is_valid(r) && !i.value(r).is_empty())
            .map(move |r| (u.value(r), i.value(r), w.value(r) * q.value(r)))
    });
    let mut pairs = build_pairs(entries, Some(users.to_vec()), true, seed, holdout)?;
    pairs.labels = labels;
    Ok(pairs)
}

/// The item side of an item shard, from its staged rows (item, user, strength).
pub fn item_pairs(batches: &[RecordBatch], seed: u64, holdout: f64) -> Result<Pairs, WorkerError> {
    use crate::staging::{ITEM, STRENGTH, USER};
    let mut cols = Vec::with_capacity(batches.len());
    for b in batches {
        cols.push((
            column::<StringArray>(b, ITEM, "item-shard")?,
            column::<StringArray>(b, USER, "item-shard")?,
            column::<Float64Array>(b, STRENGTH, "item-shard")?,
        ));
    }
    let entries = cols
        .into_iter()
        .flat_map(|(i, u, s)| (0..i.len()).map(move |r| (i.value(r), u.value(r), s.value(r))));
    build_pairs(entries, None, false, seed, holdout)
}

/// Where the other side's ids of a [`Pairs`] live: `(shard, position)` of each,
/// from the shards' id lists.
pub fn locate(
    job: &str,
    others: &[String],
    shards: u32,
    lists: &HashMap<u32, std::sync::Arc<Vec<String>>>,
) -> Result<Vec<(u32, u32)>, WorkerError> {
    others
        .iter()
        .map(|id| {
            let s = hash::shard_of(id, shards);
            let list = lists.get(&s).ok_or_else(|| WorkerError::Inconsistent {
                job: job.to_string(),
                detail: format!("no id list of shard {s} fetched"),
            })?;
            let pos = list.binary_search_by(|x| x.as_str().cmp(id)).map_err(|_| {
                WorkerError::Inconsistent {
                    job: job.to_string(),
                    detail: format!("`{id}` is not among the {} ids of shard {s}", list.len()),
                }
            })?;
            Ok((s, pos as u32))
        })
        .collect()
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

/// The confidence matrix of a [`Pairs`] in the local space `needed`, given where
/// each of its `others` lives.
pub fn confidence_matrix(
    pairs: &Pairs,
    located: &[(u32, u32)],
    needed: &Needed,
    als: &AlsSpec,
) -> Csr {
    let column: Vec<Option<u32>> = located
        .iter()
        .map(|&at| Some(needed.index(at).expect("every located row is needed")))
        .collect();
    confidence_rows(pairs, &column, needed.rows.len(), als).0
}

/// The confidence matrix of a [`Pairs`] with `cols` columns, where `column[o]` is
/// the column of its other `o`; pairs whose other has no column are left out and
/// counted (the second value). Each row's columns are sorted.
pub fn confidence_rows(
    pairs: &Pairs,
    column: &[Option<u32>],
    cols: usize,
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
            match column[o as usize] {
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
        cols,
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
    fn pairs_sum_in_order_drop_nonpositive_and_sort() {
        let entries = vec![
            ("u2", "b", 1.0),
            ("u1", "c", 2.0),
            ("u2", "b", 0.5),
            ("u1", "a", 1.0),
            ("u1", "a", -1.0),
            ("u3", "c", 4.0),
        ];
        let p = build_pairs(entries.into_iter(), None, true, 7, 0.0).unwrap();
        assert_eq!(p.ids, ["u1", "u2", "u3"]);
        assert_eq!(p.others, ["b", "c"]);
        assert_eq!(p.indptr, [0, 1, 2, 3]);
        assert_eq!(p.row(0), (&[1u32][..], &[2.0][..]));
        assert_eq!(p.row(1), (&[0u32][..], &[1.5][..]));
        assert_eq!(p.nonpositive, 1);
        assert!(p.held.is_empty());
    }

    #[test]
    fn both_sides_hold_out_the_same_pairs() {
        let mut user_side = Vec::new();
        let mut item_side = Vec::new();
        for u in 0..50 {
            for i in 0..20 {
                if (u * 7 + i * 3) % 5 == 0 {
                    let (us, is) = (format!("u{u}"), format!("i{i}"));
                    user_side.push((us.clone(), is.clone(), 1.0 + i as f64));
                    item_side.push((is, us, 1.0 + i as f64));
                }
            }
        }
        let a = build_pairs(
            user_side
                .iter()
                .map(|(a, b, s)| (a.as_str(), b.as_str(), *s)),
            None,
            true,
            3,
            0.25,
        )
        .unwrap();
        let b = build_pairs(
            item_side
                .iter()
                .map(|(a, b, s)| (a.as_str(), b.as_str(), *s)),
            None,
            false,
            3,
            0.25,
        )
        .unwrap();
        let mut held_a: Vec<(String, String)> = a
            .held
            .iter()
            .map(|(r, i)| (a.ids[*r as usize].clone(), i.clone()))
            .collect();
        let mut held_b: Vec<(String, String)> = b
            .held
            .iter()
            .map(|(r, u)| (u.clone(), b.ids[*r as usize].clone()))
            .collect();
        held_a.sort();
        held_b.sort();
        assert_eq!(held_a, held_b);
        let total = user_side.len();
        assert!(
            held_a.len() > total / 8 && held_a.len() < total * 3 / 8,
            "{}",
            held_a.len()
        );
        assert_eq!(a.nnz() + held_a.len(), total);
        assert_eq!(b.nnz() + held_b.len(), total);
    }

    #[test]
    fn fixed_rows_keep_users_without_pairs() {
        let users = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let p = build_pairs(
            vec![("c", "x", 1.0)].into_iter(),
            Some(users.clone()),
            true,
            1,
            0.0,
        )
        .unwrap();
        assert_eq!(p.ids, users);
        assert_eq!(p.indptr, [0, 0, 0, 1]);
        let err =
            build_pairs(vec![("d", "x", 1.0)].into_iter(), Some(users), true, 1, 0.0).unwrap_err();
        assert!(err.to_string().contains("`d`"), "{err}");
    }

    #[test]
    fn confidence_rows_follow_the_global_order() {
        let p = build_pairs(
            vec![("u", "zz", 1.0), ("u", "aa", 2.0)].into_iter(),
            None,
            true,
            1,
            0.0,
        )
        .unwrap();
        // "aa" lives in shard 3, "zz" in shard 1: local order is by (shard, position).
        let located = vec![(3, 0), (1, 5)];
        let needed = Needed::new(vec![(3, 0), (1, 5), (1, 2)]);
        assert_eq!(needed.by_shard(), vec![(1, vec![2, 5], 0), (3, vec![0], 2)]);
        let m = confidence_matrix(&p, &located, &needed, &spec());
        assert_eq!(m.indices, [1, 2]);
        assert_eq!(m.values, [41.0, 81.0]);
        m.validate().unwrap();
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
    fn initial_rows_depend_on_the_id_only() {
        let mut a = [0f32; 8];
        let mut b = [0f32; 8];
        initial_row(5, Side::Users, "17850", &mut a);
        initial_row(5, Side::Users, "17850", &mut b);
        assert_eq!(a, b);
        initial_row(5, Side::Items, "17850", &mut b);
        assert_ne!(a, b);
        assert!(a.iter().all(|v| (0.0..0.01).contains(v)));
    }
}
