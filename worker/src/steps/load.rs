//! Loading a shard: the staged parts of its splits merged into one table per
//! shard, in one pass over integer keys: its ids ([`IdTable`]), per user recency,
//! frequency and monetary value, and with ALS every user's (or item's) pairs with
//! the other side, by row.
//!
//! Everything is summed per split in split order, so a shard holds the same bits
//! whichever worker ingested which split and whichever worker loads it. A pair's
//! strength is summed over its splits' strengths in split order on both sides,
//! so both sides hold the same value.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, StringArray, StringBuilder};
use futures::StreamExt;
use shoal_proto::pb;
use shoal_spec::hash::shard_of_key;
use shoal_spec::rfm;
use shoal_spec::spec::JobSpec;
use shoal_store::Location;

use crate::WorkerError;
use crate::extra;
use crate::ids::{IdLimits, IdMerge, IdTable};
use crate::job::{ItemNames, JobRun, Shard, joined, stop_if_cancelled};
use crate::staging::{ItemPartial, UserPartial, read_item_partials, read_user_partials};
use crate::steps::als::held_out;

const MS_PER_DAY: f64 = 86_400_000.0;

/// Features per user of the RFM block: recency, frequency, monetary.
pub const DIMS: usize = 3;

/// What a load needs to know of the job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadSettings {
    /// The latest event time of the whole input: recency is measured from it.
    pub reference_ms: i64,
    pub shards: u32,
    /// Seed and share of the pairs held out for evaluation.
    pub seed: u64,
    pub holdout: f64,
    /// Whether the job learns ALS factors (the user side then keeps its pairs).
    pub als: bool,
    pub limits: IdLimits,
}

/// Per-user recency (days), frequency (orders) and monetary value, by position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rfm {
    pub recency_days: Vec<f64>,
    pub frequency: Vec<u64>,
    pub monetary: Vec<f64>,
}

impl Rfm {
    pub fn len(&self) -> usize {
        self.recency_days.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recency_days.is_empty()
    }

    /// The unscaled features of user `u`: log1p of recency, frequency and
    /// monetary (sign-preserving for monetary).
    pub fn log_features(&self, u: usize) -> [f64; DIMS] {
        [
            self.recency_days[u].max(0.0).ln_1p(),
            (self.frequency[u] as f64).ln_1p(),
            signed_log1p(self.monetary[u]),
        ]
    }

    /// Customers per key of recency, frequency and monetary value (the keys
    /// RFM scores rank by, `shoal_spec::rfm`), in that order.
    pub fn score_keys(&self) -> Vec<pb::Histogram> {
        let mut counts: [BTreeMap<i64, u64>; 3] = Default::default();
        for u in 0..self.len() {
            let keys = [
                rfm::recency_key(self.recency_days[u]),
                rfm::frequency_key(self.frequency[u]),
                rfm::monetary_key(self.monetary[u]),
            ];
            for (c, key) in counts.iter_mut().zip(keys) {
                *c.entry(key).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .map(|c| pb::Histogram {
                keys: c.keys().copied().collect(),
                counts: c.values().copied().collect(),
            })
            .collect()
    }

    /// Streaming moments of the log features, in user order.
    pub fn moments(&self) -> Vec<pb::Moments> {
        let mut m = vec![pb::Moments::default(); DIMS];
        for u in 0..self.len() {
            for (s, x) in m.iter_mut().zip(self.log_features(u)) {
                add_to_moments(s, x);
            }
        }
        m
    }

    pub fn heap_bytes(&self) -> usize {
        self.len() * 24
    }
}

/// `sign(x) * ln(1 + |x|)`: log1p for positive values, defined for negative ones
/// (net refunds) too.
pub fn signed_log1p(x: f64) -> f64 {
    x.signum() * x.abs().ln_1p()
}

/// The inverse of [`signed_log1p`].
pub fn signed_expm1(y: f64) -> f64 {
    y.signum() * y.abs().exp_m1()
}

/// Streaming moments (count, mean, M2) of every feature of row-major `features`.
pub fn moments(features: &[f64], dims: usize) -> Vec<pb::Moments> {
    let mut m = vec![pb::Moments::default(); dims];
    for row in features.chunks_exact(dims) {
        for (s, &x) in m.iter_mut().zip(row) {
            add_to_moments(s, x);
        }
    }
    m
}

/// Adds `x` to the streaming moments `s` (Welford).
pub fn add_to_moments(s: &mut pb::Moments, x: f64) {
    s.count += 1;
    let delta = x - s.mean;
    s.mean += delta / s.count as f64;
    s.m2 += delta * (x - s.mean);
}

/// One side's pairs with the other side, by row: the other side's keys in the
/// global order (their shard, then key: the order of the other side's positions),
/// and the strength of each pair.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pairs {
    /// `rows + 1` offsets into `others` / `strength`.
    pub indptr: Vec<u64>,
    pub others: Vec<u64>,
    pub strength: Vec<f64>,
    /// Held-out pairs (row, other key), by row then the global order.
    pub held: Vec<(u32, u64)>,
    /// Pairs whose summed strength is not positive (dropped: no preference).
    pub nonpositive: u64,
}

impl Pairs {
    pub fn rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }

    pub fn nnz(&self) -> usize {
        self.others.len()
    }

    /// The row of `r`: (other keys, strengths).
    pub fn row(&self, r: usize) -> (&[u64], &[f64]) {
        let (a, b) = (self.indptr[r] as usize, self.indptr[r + 1] as usize);
        (&self.others[a..b], &self.strength[a..b])
    }

    pub fn heap_bytes(&self) -> usize {
        self.indptr.capacity() * 8
            + self.others.capacity() * 8
            + self.strength.capacity() * 8
            + self.held.capacity() * 16
    }
}

/// A user shard, loaded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserShard {
    pub ids: IdTable,
    pub rfm: Rfm,
    /// With ALS: every user's items.
    pub pairs: Option<Pairs>,
}

/// An item shard, loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemShard {
    pub ids: IdTable,
    /// The first non-empty label of each item in split order (null: none).
    pub labels: StringArray,
    /// Every item's users.
    pub pairs: Pairs,
}

/// One part's entries of a side's pairs: own local positions, other keys,
/// strengths; and the part's map from local to shard positions.
struct PartPairs<'a> {
    own: &'a [u32],
    others: &'a [u64],
    strength: &'a [f64],
    remap: &'a [u32],
}

/// The pairs of a shard's `rows` rows from its parts (in split order): each pair's
/// strengths summed in split order, rows in the global order of the other side,
/// non-positive pairs dropped (counted), the drawn ones held out. `own_key(r)` is
/// the key of row `r`; `user_is_own` says which key is the user's.
fn merge_pairs(
    rows: usize,
    parts: &[PartPairs<'_>],
    own_key: impl Fn(usize) -> u64,
    user_is_own: bool,
    s: &LoadSettings,
) -> Pairs {
    let mut indptr = vec![0u64; rows + 1];
    for p in parts {
        for &o in p.own {
            indptr[p.remap[o as usize] as usize + 1] += 1;
        }
    }
    for r in 0..rows {
        indptr[r + 1] += indptr[r];
    }
    let total = indptr[rows] as usize;
    let mut entries: Vec<(u64, f64)> = vec![(0, 0.0); total];
    let mut cursor: Vec<u64> = indptr[..rows].to_vec();
    for p in parts {
        for ((&o, &k), &v) in p.own.iter().zip(p.others).zip(p.strength) {
            let r = p.remap[o as usize] as usize;
            entries[cursor[r] as usize] = (k, v);
            cursor[r] += 1;
        }
    }
    drop(cursor);
    let shards = s.shards;
    let mut out = Pairs {
        indptr: Vec::with_capacity(rows + 1),
        others: Vec::with_capacity(total),
        strength: Vec::with_capacity(total),
        held: Vec::new(),
        nonpositive: 0,
    };
    out.indptr.push(0);
    for r in 0..rows {
        let row = &mut entries[indptr[r] as usize..indptr[r + 1] as usize];
        // stable: a pair's entries stay in split order
        row.sort_by_key(|&(k, _)| (shard_of_key(k, shards), k));
        let own = own_key(r);
        let mut i = 0;
        while i < row.len() {
            let k = row[i].0;
            let mut sum = row[i].1;
            i += 1;
            while i < row.len() && row[i].0 == k {
                sum += row[i].1;
                i += 1;
            }
            if !(sum > 0.0 && sum.is_finite()) {
                out.nonpositive += 1;
                continue;
            }
            let (user, item) = if user_is_own { (own, k) } else { (k, own) };
            if held_out(s.seed, s.holdout, user, item) {
                out.held.push((r as u32, k));
                continue;
            }
            out.others.push(k);
            out.strength.push(sum);
        }
        out.indptr.push(out.others.len() as u64);
    }
    out.others.shrink_to_fit();
    out.strength.shrink_to_fit();
    out
}

/// Merges the staged parts (in split order) of user shard `shard`.
pub fn user_shard(
    shard: u32,
    parts: &[UserPartial],
    s: &LoadSettings,
) -> Result<UserShard, WorkerError> {
    let tables: Vec<(&[u64], &StringArray)> = parts
        .iter()
        .map(|p| (p.keys.values().as_ref(), &p.ids))
        .collect();
    let IdMerge { table: ids, remap } = IdMerge::new("user", shard, &tables, s.limits)?;
    let n = ids.len();
    let mut last = vec![i64::MIN; n];
    let mut loose = vec![0u64; n];
    let mut monetary = vec![0.0f64; n];
    let mut orders: Vec<(u32, u64)> =
        Vec::with_capacity(parts.iter().map(|p| p.orders.len()).sum());
    for (p, map) in parts.iter().zip(&remap) {
        for (i, &u) in map.iter().enumerate() {
            let u = u as usize;
            last[u] = last[u].max(p.last_ms.value(i));
            loose[u] += p.loose.value(i);
            monetary[u] += p.monetary.value(i);
        }
        orders.extend(
            p.order_users
                .values()
                .iter()
                .zip(p.orders.values().iter())
                .map(|(&u, &o)| (map[u as usize], o)),
        );
    }
    orders.sort_unstable();
    orders.dedup();
    let mut frequency = loose;
    for &(u, _) in &orders {
        frequency[u as usize] += 1;
    }
    drop(orders);
    let rfm = Rfm {
        recency_days: last
            .iter()
            .map(|&t| ((s.reference_ms.saturating_sub(t)) as f64 / MS_PER_DAY).max(0.0))
            .collect(),
        frequency,
        monetary,
    };
    let pairs = s.als.then(|| {
        let parts: Vec<PartPairs<'_>> = parts
            .iter()
            .zip(&remap)
            .map(|(p, map)| PartPairs {
                own: p.pair_users.values(),
                others: p.pair_items.values(),
                strength: p.pair_strength.values(),
                remap: map,
            })
            .collect();
        merge_pairs(n, &parts, |r| ids.keys()[r], true, s)
    });
    Ok(UserShard { ids, rfm, pairs })
}

/// Merges the staged parts (in split order) of item shard `shard`.
pub fn item_shard(
    shard: u32,
    parts: &[ItemPartial],
    s: &LoadSettings,
) -> Result<ItemShard, WorkerError> {
    let tables: Vec<(&[u64], &StringArray)> = parts
        .iter()
        .map(|p| (p.keys.values().as_ref(), &p.ids))
        .collect();
    let IdMerge { table: ids, remap } = IdMerge::new("item", shard, &tables, s.limits)?;
    // the first label in split order
    let mut label_of: Vec<Option<(u32, u32)>> = vec![None; ids.len()];
    for (t, (p, map)) in parts.iter().zip(&remap).enumerate() {
        for (i, &pos) in map.iter().enumerate() {
            if label_of[pos as usize].is_none() && p.labels.is_valid(i) {
                label_of[pos as usize] = Some((t as u32, i as u32));
            }
        }
    }
    let mut labels = StringBuilder::new();
    for l in &label_of {
        labels.append_option(l.map(|(t, i)| parts[t as usize].labels.value(i as usize)));
    }
    let pair_parts: Vec<PartPairs<'_>> = parts
        .iter()
        .zip(&remap)
        .map(|(p, map)| PartPairs {
            own: p.pair_items.values(),
            others: p.pair_users.values(),
            strength: p.pair_strength.values(),
            remap: map,
        })
        .collect();
    let pairs = merge_pairs(ids.len(), &pair_parts, |r| ids.keys()[r], false, s);
    Ok(ItemShard {
        ids,
        labels: labels.finish(),
        pairs,
    })
}

// ---------------------------------------------------------------------------
// A worker's shards of a job, loaded in parallel

/// What a worker loaded for a job: its user shards (with their pairs when the
/// job learns ALS factors), its item shards, and the figures the coordinator
/// reduces.
pub struct Loaded {
    pub users: BTreeMap<u32, Shard>,
    /// With ALS: each user shard's keys and pairs.
    pub user_pairs: BTreeMap<u32, (Arc<Vec<u64>>, Pairs)>,
    /// With ALS: each item shard's names, keys and pairs.
    pub items: BTreeMap<u32, (ItemNames, Arc<Vec<u64>>, Pairs)>,
    pub stats: Vec<pb::ShardStats>,
    pub item_stats: Vec<pb::ItemShardStats>,
}

/// One shard's load, user or item side.
enum One {
    User(u32, Box<(Shard, Option<Pairs>)>, pb::ShardStats),
    Item(u32, Box<ItemShard>, pb::ItemShardStats),
}

/// Loads the user shards and item shards `req` names, `parallelism` at a time
/// (each merged on its own thread): the staged parts are read, merged, and the
/// features.extra rows joined. The result does not depend on `parallelism`.
pub async fn load_shards(
    spec: Arc<JobSpec>,
    staging: Arc<Location>,
    req: &pb::LoadShardsRequest,
    run: Arc<JobRun>,
    parallelism: usize,
) -> Result<Loaded, WorkerError> {
    let settings = LoadSettings {
        reference_ms: req.reference_time_ms,
        shards: spec.cluster.shards,
        seed: spec.segments.seed,
        holdout: spec.evaluate.holdout,
        als: spec.features.als,
        limits: IdLimits::default(),
    };
    let columns = Arc::new(req.extra_columns.clone());
    let work: Vec<(bool, u32)> = req
        .shards
        .iter()
        .map(|&s| (false, s))
        .chain(req.item_shards.iter().map(|&s| (true, s)))
        .collect();
    let job = run.control.job.clone();
    let results: Vec<Result<One, WorkerError>> = futures::stream::iter(work)
        .map(|(item, shard)| {
            let (spec, staging, run2, columns) =
                (spec.clone(), staging.clone(), run.clone(), columns.clone());
            let job = job.clone();
            let task = async move {
                stop_if_cancelled(&run2.control.cancel, &job)?;
                if item {
                    let parts = read_item_partials(&staging, shard).await?;
                    let loaded = run2
                        .blocking("load", move || item_shard(shard, &parts, &settings))
                        .await?;
                    let confidence_sum: f64 = loaded
                        .pairs
                        .strength
                        .iter()
                        .map(|&s| spec.als.confidence_of(s))
                        .sum();
                    let stats = pb::ItemShardStats {
                        shard,
                        items: loaded.ids.len() as u64,
                        pairs: loaded.pairs.nnz() as u64,
                        confidence_sum,
                    };
                    return Ok(One::Item(shard, Box::new(loaded), stats));
                }
                let parts = read_user_partials(&staging, shard).await?;
                let table = if columns.is_empty() {
                    None
                } else {
                    Some(extra::ShardExtra::read(&staging, shard, &columns).await?)
                };
                let e = extra::dims(&columns);
                run2.blocking("load", move || {
                    let loaded = user_shard(shard, &parts, &settings)?;
                    drop(parts);
                    let mut stats = pb::ShardStats {
                        shard,
                        users: loaded.ids.len() as u64,
                        moments: loaded.rfm.moments(),
                        rfm_keys: loaded.rfm.score_keys(),
                        ..Default::default()
                    };
                    if let Some(p) = &loaded.pairs {
                        stats.pairs = p.nnz() as u64;
                        stats.held_out = p.held.len() as u64;
                        stats.nonpositive = p.nonpositive;
                    }
                    let mut user = Shard::new(loaded.ids, loaded.rfm);
                    if let Some(table) = table {
                        let joined = table.join(&user.ids, e);
                        stats.extra_moments = extra::moments(&joined.values, e);
                        stats.extra_users = joined.users_with_row;
                        stats.extra_missing_values = joined.missing;
                        stats.extra_orphans = joined.orphans.len() as u64;
                        user.extra = joined.values;
                        user.orphans = joined.orphans;
                    }
                    Ok(One::User(shard, Box::new((user, loaded.pairs)), stats))
                })
                .await
            };
            joined(run.spawn(task), "load task")
        })
        .buffer_unordered(parallelism.max(1))
        .collect()
        .await;
    let mut out = Loaded {
        users: BTreeMap::new(),
        user_pairs: BTreeMap::new(),
        items: BTreeMap::new(),
        stats: Vec::new(),
        item_stats: Vec::new(),
    };
    for r in results {
        match r? {
            One::User(shard, loaded, stats) => {
                let (user, pairs) = *loaded;
                if let Some(p) = pairs.filter(|_| spec.features.als) {
                    out.user_pairs.insert(shard, (user.ids.shared_keys(), p));
                }
                out.users.insert(shard, user);
                out.stats.push(stats);
            }
            One::Item(shard, loaded, stats) => {
                let ItemShard { ids, labels, pairs } = *loaded;
                let keys = ids.shared_keys();
                let names = ItemNames {
                    ids: ids.ids().clone(),
                    labels,
                };
                out.items.insert(shard, (names, keys, pairs));
                out.item_stats.push(stats);
            }
        }
    }
    out.stats.sort_by_key(|s| s.shard);
    out.item_stats.sort_by_key(|s| s.shard);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::{KeptRow, RowSink, SplitPartials, read_item_partials, read_user_partials};
    use shoal_spec::hash::id_key;
    use shoal_store::resolve;
    use std::collections::{BTreeMap, BTreeSet};

    const DAY: i64 = 86_400_000;

    fn settings(shards: u32, holdout: f64) -> LoadSettings {
        LoadSettings {
            reference_ms: 10 * DAY,
            shards,
            seed: 3,
            holdout,
            als: true,
            limits: IdLimits::default(),
        }
    }

    /// (user, time, order, item, quantity, money)
    type Row = (String, i64, Option<String>, Option<String>, f64, f64);

    /// A seeded log of `n` rows over a few users and items, with unicode ids,
    /// ids differing only in case, rows without orders or items.
    fn log(n: usize, seed: u64) -> Vec<Row> {
        let users = [
            "ann", "Ann", "ANN", "bø", "🦀", "c", "d", "e", "17850", "x y",
        ];
        let mut s = seed;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        (0..n)
            .map(|_| {
                let u = users[(next() % users.len() as u64) as usize].to_string();
                let t = (next() % (9 * DAY as u64)) as i64;
                let order = (next() % 5 != 0).then(|| format!("o{}", next() % 40));
                let item = (next() % 7 != 0).then(|| format!("i{}", next() % 23));
                let q = (next() % 5) as f64 - 0.5;
                (u, t, order, item, q, q * 2.25)
            })
            .collect()
    }

    async fn stage(rows: &[Row], splits: usize, shards: u32) -> shoal_store::Location {
        let dir = tempfile::tempdir().unwrap().keep();
        let staging = resolve(&dir.display().to_string()).unwrap();
        for (m, chunk) in rows.chunks(rows.len().div_ceil(splits)).enumerate() {
            // chunks of 97 rows: several per split
            let mut p = SplitPartials::new(m as u32, shards, true, &staging).with_chunk_rows(97);
            for r in chunk {
                p.push(&KeptRow {
                    user: &r.0,
                    time_ms: r.1,
                    order: r.2.as_deref(),
                    item: r.3.as_deref(),
                    quantity: r.4,
                    monetary: r.5,
                    weight: 1.0,
                    item_label: r.3.as_deref(),
                })
                .unwrap();
            }
            p.write().await.unwrap();
        }
        staging
    }

    /// Loaded shards equal a brute-force reference over the rows (per split sums
    /// in split order), and users, items and pairs land in their shards.
    #[tokio::test]
    async fn shards_equal_a_brute_force_reference() {
        let rows = log(3000, 11);
        let (splits, shards) = (4, 3);
        let staging = stage(&rows, splits, shards).await;
        assert!(
            read_user_partials(&staging, 0).await.unwrap().len() > splits,
            "several chunks per split"
        );
        let s = settings(shards, 0.2);
        // the chunks as staging cuts them: splits, then 97 rows at a time
        let chunks: Vec<&[Row]> = rows
            .chunks(rows.len().div_ceil(splits))
            .flat_map(|split| split.chunks(97))
            .collect();
        let n = chunks.len();
        // reference: per user
        let mut last: BTreeMap<&str, i64> = BTreeMap::new();
        let mut orders: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut loose: BTreeMap<&str, u64> = BTreeMap::new();
        let mut money: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        // per (user, item): per chunk sums
        let mut pair: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
        for (m, ch) in chunks.iter().enumerate() {
            for r in ch.iter() {
                let u = r.0.as_str();
                let e = last.entry(u).or_insert(i64::MIN);
                *e = (*e).max(r.1);
                match &r.2 {
                    Some(o) => {
                        orders.entry(u).or_default().insert(o);
                    }
                    None => *loose.entry(u).or_default() += 1,
                }
                let v = money.entry(u).or_insert_with(|| vec![0.0; n]);
                v[m] += r.5;
                if let Some(i) = &r.3 {
                    let v = pair.entry((u, i)).or_insert_with(|| vec![0.0; n]);
                    v[m] += r.4;
                }
            }
        }
        let sum = |v: &Vec<f64>| v.iter().fold(0.0, |a, b| a + b);
        let mut seen_users = 0;
        let mut user_pairs: BTreeMap<(String, String), f64> = BTreeMap::new();
        let mut held: BTreeSet<(String, String)> = BTreeSet::new();
        for shard in 0..shards {
            let parts = read_user_partials(&staging, shard).await.unwrap();
            let us = user_shard(shard, &parts, &s).unwrap();
            let p = us.pairs.as_ref().unwrap();
            for r in 0..us.ids.len() {
                seen_users += 1;
                let id = us.ids.id(r);
                assert_eq!(shard_of_key(id_key(id), shards), shard);
                assert_eq!(us.ids.keys()[r], id_key(id));
                let want_rec = ((10 * DAY - last[id]) as f64 / MS_PER_DAY).max(0.0);
                assert_eq!(us.rfm.recency_days[r], want_rec, "{id}");
                let want_f = orders.get(id).map_or(0, |o| o.len() as u64)
                    + loose.get(id).copied().unwrap_or(0);
                assert_eq!(us.rfm.frequency[r], want_f, "{id}");
                assert_eq!(
                    us.rfm.monetary[r].to_bits(),
                    sum(&money[id]).to_bits(),
                    "{id}"
                );
                let (others, strength) = p.row(r);
                let order: Vec<(u32, u64)> = others
                    .iter()
                    .map(|&k| (shard_of_key(k, shards), k))
                    .collect();
                assert!(order.windows(2).all(|w| w[0] < w[1]), "global order");
                for (&k, &v) in others.iter().zip(strength) {
                    let item = (0..23)
                        .map(|i| format!("i{i}"))
                        .find(|i| id_key(i) == k)
                        .unwrap();
                    user_pairs.insert((id.to_string(), item), v);
                }
            }
            for &(r, k) in &p.held {
                let item = (0..23)
                    .map(|i| format!("i{i}"))
                    .find(|i| id_key(i) == k)
                    .unwrap();
                held.insert((us.ids.id(r as usize).to_string(), item));
            }
        }
        assert_eq!(seen_users, last.len());
        let mut want_pairs = BTreeMap::new();
        let mut nonpositive = 0;
        for ((u, i), v) in &pair {
            let total = sum(v);
            if total <= 0.0 {
                nonpositive += 1;
                continue;
            }
            if held.contains(&(u.to_string(), i.to_string())) {
                continue;
            }
            want_pairs.insert((u.to_string(), i.to_string()), total);
        }
        assert!(nonpositive > 0 && !held.is_empty());
        for (k, v) in &want_pairs {
            assert_eq!(user_pairs[k].to_bits(), v.to_bits(), "{k:?}");
        }
        assert_eq!(user_pairs.len(), want_pairs.len());

        // the item side holds the same pairs, bit for bit, and the same held-out ones
        let mut item_pairs: BTreeMap<(String, String), f64> = BTreeMap::new();
        let mut item_held = BTreeSet::new();
        let user_of = |k: u64| last.keys().find(|u| id_key(u) == k).unwrap().to_string();
        for shard in 0..shards {
            let parts = read_item_partials(&staging, shard).await.unwrap();
            let is = item_shard(shard, &parts, &s).unwrap();
            for r in 0..is.ids.len() {
                let id = is.ids.id(r).to_string();
                assert_eq!(is.labels.value(r), id, "the label is the first one");
                let (others, strength) = is.pairs.row(r);
                for (&k, &v) in others.iter().zip(strength) {
                    item_pairs.insert((user_of(k), id.clone()), v);
                }
            }
            for &(r, k) in &is.pairs.held {
                item_held.insert((user_of(k), is.ids.id(r as usize).to_string()));
            }
        }
        assert_eq!(item_held, held);
        assert_eq!(item_pairs.len(), user_pairs.len());
        for (k, v) in &item_pairs {
            assert_eq!(v.to_bits(), user_pairs[k].to_bits());
        }
    }

    /// Loading shards side by side gives what loading them one after the other
    /// gives, bit for bit (users, RFM, pairs, item shards, figures).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_load_equals_sequential_bit_for_bit() {
        let rows = log(5000, 29);
        let shards = 6;
        let staging = stage(&rows, 5, shards).await;
        let mut spec = JobSpec::parse(shoal_spec::spec::DEMO_SPEC).unwrap();
        spec.cluster.shards = shards;
        spec.evaluate.holdout = 0.1;
        let spec = Arc::new(spec);
        let req = pb::LoadShardsRequest {
            shards: (0..shards).collect(),
            item_shards: (0..shards).collect(),
            reference_time_ms: 10 * DAY,
            ..Default::default()
        };
        let mut loads = Vec::new();
        for parallelism in [1, 4] {
            let run = Arc::new(JobRun::new("j", 1));
            let l = load_shards(
                spec.clone(),
                Arc::new(staging.clone()),
                &req,
                run,
                parallelism,
            )
            .await
            .unwrap();
            loads.push(l);
        }
        let (a, b) = (&loads[0], &loads[1]);
        assert_eq!(a.stats, b.stats);
        assert_eq!(a.item_stats, b.item_stats);
        assert_eq!(a.users.len(), shards as usize);
        for (s, ua) in &a.users {
            let ub = &b.users[s];
            assert_eq!(ua.ids, ub.ids);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&ua.rfm.recency_days), bits(&ub.rfm.recency_days));
            assert_eq!(ua.rfm.frequency, ub.rfm.frequency);
            assert_eq!(bits(&ua.rfm.monetary), bits(&ub.rfm.monetary));
        }
        for (s, (ka, pa)) in &a.user_pairs {
            let (kb, pb_) = &b.user_pairs[s];
            assert_eq!(ka, kb);
            assert_eq!(pa.indptr, pb_.indptr);
            assert_eq!(pa.others, pb_.others);
            assert_eq!(
                pa.strength.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                pb_.strength.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(pa.held, pb_.held);
        }
        for (s, (na, ka, pa)) in &a.items {
            let (nb, kb, pb_) = &b.items[s];
            assert_eq!((&na.ids, &na.labels, ka), (&nb.ids, &nb.labels, kb));
            assert_eq!(pa, pb_);
        }
    }
}
