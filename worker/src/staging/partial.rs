//! The rows of one split, aggregated per shard while ingest reads them, and the
//! staged objects they become.
//!
//! A user's part of a split: its last event time, its events, the sum of its
//! money (in row order), the distinct orders it placed (by `xxh3` of the order
//! id), and with ALS the strength of each of its (user, item) pairs (the sum of
//! `weight × quantity` over the pair's rows, in row order). An item's part: its
//! label (the first non-empty one in row order) and the same pair strengths seen
//! from the item. Both sides sum a pair's rows in the same order, so the two
//! sides' strengths are the same bits.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, StringArray, StringBuilder, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::{
    DataType, Field, Float64Type, Int64Type, SchemaRef, UInt32Type, UInt64Type,
};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use shoal_proto::sketch::Distinct;
use shoal_spec::hash::{id_key, shard_of_key};
use shoal_store::Location;

use super::{
    decode_tables, encode_tables, item_prefix, list_splits, put_all, schema, split_object,
    user_prefix,
};
use crate::error::WorkerError;

/// Hash maps keyed by integers that are hashes already, or by small tuples of them.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

fn fast_map<K, V>() -> FastMap<K, V> {
    FastMap::with_hasher(foldhash::fast::FixedState::default())
}

/// One cleaned row on its way to its shards. Strings are borrowed from the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeptRow<'a> {
    pub user: &'a str,
    pub time_ms: i64,
    pub order: Option<&'a str>,
    pub item: Option<&'a str>,
    pub quantity: f64,
    pub monetary: f64,
    /// The row's event weight (`InputSpec::event_weight`).
    pub weight: f64,
    pub item_label: Option<&'a str>,
}

impl KeptRow<'_> {
    /// The strength of the row's (user, item) interaction: `weight * quantity`.
    pub fn strength(&self) -> f64 {
        self.weight * self.quantity
    }
}

/// Where the cleaner hands its kept rows.
pub trait RowSink {
    fn push(&mut self, row: &KeptRow<'_>) -> Result<(), WorkerError>;

    /// Staged objects ready to be put (the readers put them between batches).
    fn ready(&mut self) -> Vec<(Location, Bytes)> {
        Vec::new()
    }
}

/// Rows of a split buffered before they are aggregated into one chunk of staged
/// objects (about 60 bytes each).
pub const CHUNK_ROWS: usize = 1 << 20;

/// No order id (a row that is an order of its own).
const NO_ORDER: u64 = u64::MAX;
/// No item.
const NO_ITEM: u64 = u64::MAX;

/// The kept rows of one user shard in the current chunk, as they came.
#[derive(Default)]
struct UserRows {
    keys: Vec<u64>,
    ids: StringBuilder,
    time: Vec<i64>,
    /// `xxh3` of the order id, or [`NO_ORDER`].
    orders: Vec<u64>,
    monetary: Vec<f64>,
    /// With ALS: the item's key (or [`NO_ITEM`]) and the row's strength.
    items: Vec<u64>,
    strength: Vec<f64>,
}

/// The kept rows with an item of one item shard in the current chunk.
#[derive(Default)]
struct ItemRows {
    keys: Vec<u64>,
    ids: StringBuilder,
    users: Vec<u64>,
    strength: Vec<f64>,
}

/// What was staged for one shard of one split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedFile {
    pub shard: u32,
    /// Users (items) of the shard in the split (counted per chunk).
    pub entities: u64,
    /// (user, item) pairs of the shard in the split (counted per chunk).
    pub pairs: u64,
    pub bytes: u64,
    /// Distinct users (items) and pairs of the shard in the split.
    pub entities_sketch: Distinct,
    pub pairs_sketch: Distinct,
}

/// Everything a split staged, each list in shard order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StagedFiles {
    pub users: Vec<StagedFile>,
    /// Empty without ALS.
    pub items: Vec<StagedFile>,
}

impl StagedFiles {
    fn add(list: &mut Vec<StagedFile>, f: StagedFile) {
        match list.iter_mut().find(|g| g.shard == f.shard) {
            Some(g) => {
                g.entities += f.entities;
                g.pairs += f.pairs;
                g.bytes += f.bytes;
                g.entities_sketch.merge(&f.entities_sketch);
                g.pairs_sketch.merge(&f.pairs_sketch);
            }
            None => list.push(f),
        }
    }
}

/// The kept rows of one split, appended per user shard (and with ALS per item
/// shard) as they come, and every [`CHUNK_ROWS`] rows aggregated into one staged
/// object per non-empty shard (see the module's documentation). Aggregating a
/// chunk sorts its rows by key: no hash table per row, and a split's memory is
/// bounded by its chunk, whatever the size of its input object.
pub struct SplitPartials {
    split: u32,
    shards: u32,
    staging: Location,
    als: bool,
    users: Vec<UserRows>,
    items: Vec<ItemRows>,
    /// The first non-empty label of every item of the split.
    labels: FastMap<u64, Box<str>>,
    rows: usize,
    chunk_rows: usize,
    chunk: u32,
    /// Chunks encoded, not yet handed out.
    ready: Vec<(Location, Bytes)>,
    files: StagedFiles,
}

impl SplitPartials {
    /// For split `split` of a job with `shards` shards (at least 1), staged below
    /// `staging`; `als`: the job learns ALS factors (rows with an item go to item
    /// shards too, and pairs are kept on both sides).
    pub fn new(split: u32, shards: u32, als: bool, staging: &Location) -> Self {
        assert!(shards > 0, "a job has at least one shard");
        SplitPartials {
            split,
            shards,
            staging: staging.clone(),
            als,
            users: (0..shards).map(|_| UserRows::default()).collect(),
            items: (0..if als { shards } else { 0 })
                .map(|_| ItemRows::default())
                .collect(),
            labels: fast_map(),
            rows: 0,
            chunk_rows: CHUNK_ROWS,
            chunk: 0,
            ready: Vec::new(),
            files: StagedFiles::default(),
        }
    }

    /// Chunks of `rows` rows instead of [`CHUNK_ROWS`] (tests cut small ones).
    pub fn with_chunk_rows(mut self, rows: usize) -> Self {
        self.chunk_rows = rows.max(1);
        self
    }

    /// Aggregates the buffered rows into this chunk's objects.
    fn seal(&mut self) -> Result<(), WorkerError> {
        if self.rows == 0 {
            return Ok(());
        }
        let (split, chunk) = (self.split, self.chunk);
        for shard in 0..self.shards as usize {
            let rows = std::mem::take(&mut self.users[shard]);
            if rows.keys.is_empty() {
                continue;
            }
            let loc = split_object(&user_prefix(&self.staging, shard as u32), split, chunk);
            let (tables, entities, pairs) = user_tables(rows, self.als).map_err(arrow_err)?;
            let sketches = sketches(&tables[0], &tables[2]);
            let bytes = encode_tables(&tables).map_err(|source| WorkerError::Arrow {
                file: loc.url(),
                source,
            })?;
            StagedFiles::add(
                &mut self.files.users,
                StagedFile {
                    shard: shard as u32,
                    entities,
                    pairs,
                    bytes: bytes.len() as u64,
                    entities_sketch: sketches.0,
                    pairs_sketch: sketches.1,
                },
            );
            self.ready.push((loc, bytes));
        }
        for shard in 0..self.items.len() {
            let rows = std::mem::take(&mut self.items[shard]);
            if rows.keys.is_empty() {
                continue;
            }
            let loc = split_object(&item_prefix(&self.staging, shard as u32), split, chunk);
            let (tables, entities, pairs) = item_tables(rows, &self.labels).map_err(arrow_err)?;
            let sketches = sketches(&tables[0], &tables[1]);
            let bytes = encode_tables(&tables).map_err(|source| WorkerError::Arrow {
                file: loc.url(),
                source,
            })?;
            StagedFiles::add(
                &mut self.files.items,
                StagedFile {
                    shard: shard as u32,
                    entities,
                    pairs,
                    bytes: bytes.len() as u64,
                    entities_sketch: sketches.0,
                    pairs_sketch: sketches.1,
                },
            );
            self.ready.push((loc, bytes));
        }
        self.rows = 0;
        self.chunk += 1;
        Ok(())
    }

    /// Aggregates what is buffered and returns every object not handed out yet,
    /// with what the whole split staged.
    pub fn finish(mut self) -> Result<(StagedFiles, Vec<(Location, Bytes)>), WorkerError> {
        self.seal()?;
        self.files.users.sort_by_key(|f| f.shard);
        self.files.items.sort_by_key(|f| f.shard);
        Ok((self.files, self.ready))
    }

    /// Puts every object not put yet (overwriting what an earlier attempt of the
    /// split wrote).
    pub async fn write(self) -> Result<StagedFiles, WorkerError> {
        let (files, puts) = self.finish()?;
        put_all(puts).await?;
        Ok(files)
    }
}

impl RowSink for SplitPartials {
    fn push(&mut self, row: &KeptRow<'_>) -> Result<(), WorkerError> {
        let user_key = id_key(row.user);
        let shard = shard_of_key(user_key, self.shards) as usize;
        let u = &mut self.users[shard];
        u.keys.push(user_key);
        u.ids.append_value(row.user);
        u.time.push(row.time_ms);
        u.orders.push(match row.order {
            // u64::MAX is "no order": a real one hashing there moves next door
            Some(o) => xxhash_rust::xxh3::xxh3_64(o.as_bytes()).min(NO_ORDER - 1),
            None => NO_ORDER,
        });
        u.monetary.push(row.monetary);
        if self.als {
            match row.item.filter(|i| !i.is_empty()) {
                Some(item) => {
                    let item_key = id_key(item);
                    let strength = row.strength();
                    u.items.push(item_key);
                    u.strength.push(strength);
                    let q = &mut self.items[shard_of_key(item_key, self.shards) as usize];
                    q.keys.push(item_key);
                    q.ids.append_value(item);
                    q.users.push(user_key);
                    q.strength.push(strength);
                    if let Some(label) = row.item_label.map(str::trim).filter(|l| !l.is_empty()) {
                        self.labels.entry(item_key).or_insert_with(|| label.into());
                    }
                }
                None => {
                    u.items.push(NO_ITEM);
                    u.strength.push(0.0);
                }
            }
        }
        self.rows += 1;
        if self.rows >= self.chunk_rows {
            self.seal()?;
        }
        Ok(())
    }

    fn ready(&mut self) -> Vec<(Location, Bytes)> {
        std::mem::take(&mut self.ready)
    }
}

// ---------------------------------------------------------------------------
// Tables

fn users_schema() -> SchemaRef {
    schema(vec![
        Field::new("key", DataType::UInt64, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("last_ms", DataType::Int64, false),
        Field::new("events", DataType::UInt64, false),
        Field::new("loose", DataType::UInt64, false),
        Field::new("monetary", DataType::Float64, false),
    ])
}

fn orders_schema() -> SchemaRef {
    schema(vec![
        Field::new("user", DataType::UInt32, false),
        Field::new("order", DataType::UInt64, false),
    ])
}

fn pairs_schema(own: &str, other: &str) -> SchemaRef {
    schema(vec![
        Field::new(own, DataType::UInt32, false),
        Field::new(other, DataType::UInt64, false),
        Field::new("strength", DataType::Float64, false),
    ])
}

fn items_schema() -> SchemaRef {
    schema(vec![
        Field::new("key", DataType::UInt64, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
    ])
}

/// Distinct-count sketches of a chunk's entities (their keys, the first column of
/// `entities`) and pairs (own position -> key, and the other's key).
fn sketches(entities: &RecordBatch, pairs: &RecordBatch) -> (Distinct, Distinct) {
    let keys = entities.column(0).as_primitive::<UInt64Type>().values();
    let mut e = Distinct::default();
    keys.iter().for_each(|&k| e.add(k));
    let own = pairs.column(0).as_primitive::<UInt32Type>().values();
    let other = pairs.column(1).as_primitive::<UInt64Type>().values();
    let mut p = Distinct::default();
    for (&o, &k) in own.iter().zip(other.iter()) {
        p.add(shoal_spec::hash::key(0, &[keys[o as usize], k]));
    }
    (e, p)
}

fn arrow_err(e: arrow::error::ArrowError) -> WorkerError {
    WorkerError::Arrow {
        file: "(staged object)".into(),
        source: e,
    }
}

/// The rows sorted by (key, arrival): `(key, row)`.
fn by_key(keys: &[u64]) -> Vec<(u64, u32)> {
    let mut order: Vec<(u64, u32)> = keys
        .iter()
        .enumerate()
        .map(|(i, &k)| (k, i as u32))
        .collect();
    order.sort_unstable();
    order
}

/// A side's pairs from `(own position, other key, row)` triples: sorted by (own,
/// other), each pair's strengths summed in row order.
fn pair_columns(
    mut triples: Vec<(u32, u64, u32)>,
    strength: &[f64],
) -> (Vec<u32>, Vec<u64>, Vec<f64>) {
    triples.sort_unstable();
    let (mut own, mut other, mut sum) = (Vec::new(), Vec::new(), Vec::new());
    for &(o, k, r) in &triples {
        let s = strength[r as usize];
        if own.last() == Some(&o) && other.last() == Some(&k) {
            *sum.last_mut().expect("a pair") += s;
        } else {
            own.push(o);
            other.push(k);
            sum.push(s);
        }
    }
    (own, other, sum)
}

fn pair_table(
    (own, other, sum): (Vec<u32>, Vec<u64>, Vec<f64>),
    schema: SchemaRef,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from(own)) as ArrayRef,
            Arc::new(UInt64Array::from(other)),
            Arc::new(Float64Array::from(sum)),
        ],
    )
}

/// users, orders, pairs of a chunk of one user shard: each sorted by user key;
/// with the users and pairs counted.
fn user_tables(
    mut r: UserRows,
    als: bool,
) -> Result<(Vec<RecordBatch>, u64, u64), arrow::error::ArrowError> {
    let ids = r.ids.finish();
    let order = by_key(&r.keys);
    let mut keys = Vec::new();
    let mut id_rows = Vec::new();
    let mut last_ms = Vec::new();
    let mut events = Vec::new();
    let mut loose = Vec::new();
    let mut monetary = Vec::new();
    let mut pos_of = vec![0u32; r.keys.len()];
    for &(k, row) in &order {
        let i = row as usize;
        if keys.last() != Some(&k) {
            keys.push(k);
            id_rows.push(row);
            last_ms.push(i64::MIN);
            events.push(0u64);
            loose.push(0u64);
            monetary.push(0.0f64);
        }
        let p = keys.len() - 1;
        pos_of[i] = p as u32;
        last_ms[p] = last_ms[p].max(r.time[i]);
        events[p] += 1;
        loose[p] += u64::from(r.orders[i] == NO_ORDER);
        // rows of one user come in arrival order: the sum is the split's row order
        monetary[p] += r.monetary[i];
    }
    drop(order);
    let entities = keys.len() as u64;
    let users = RecordBatch::try_new(
        users_schema(),
        vec![
            Arc::new(UInt64Array::from(keys)) as ArrayRef,
            arrow::compute::take(&ids, &UInt32Array::from(id_rows), None)?,
            Arc::new(Int64Array::from(last_ms)),
            Arc::new(UInt64Array::from(events)),
            Arc::new(UInt64Array::from(loose)),
            Arc::new(Float64Array::from(monetary)),
        ],
    )?;
    let mut orders: Vec<(u32, u64)> = r
        .orders
        .iter()
        .enumerate()
        .filter(|&(_, &o)| o != NO_ORDER)
        .map(|(i, &o)| (pos_of[i], o))
        .collect();
    r.orders = Vec::new();
    orders.sort_unstable();
    orders.dedup();
    let orders = RecordBatch::try_new(
        orders_schema(),
        vec![
            Arc::new(UInt32Array::from_iter_values(orders.iter().map(|o| o.0))) as ArrayRef,
            Arc::new(UInt64Array::from_iter_values(orders.iter().map(|o| o.1))),
        ],
    )?;
    let triples: Vec<(u32, u64, u32)> = if als {
        r.items
            .iter()
            .enumerate()
            .filter(|&(_, &k)| k != NO_ITEM)
            .map(|(i, &k)| (pos_of[i], k, i as u32))
            .collect()
    } else {
        Vec::new()
    };
    let columns = pair_columns(triples, &r.strength);
    let pairs = columns.0.len() as u64;
    let pairs_table = pair_table(columns, pairs_schema("user", "item"))?;
    Ok((vec![users, orders, pairs_table], entities, pairs))
}

/// items, pairs of a chunk of one item shard: each sorted by item key; with the
/// items and pairs counted.
fn item_tables(
    mut r: ItemRows,
    labels: &FastMap<u64, Box<str>>,
) -> Result<(Vec<RecordBatch>, u64, u64), arrow::error::ArrowError> {
    let ids = r.ids.finish();
    let order = by_key(&r.keys);
    let mut keys = Vec::new();
    let mut id_rows = Vec::new();
    let mut triples = Vec::with_capacity(order.len());
    for &(k, row) in &order {
        if keys.last() != Some(&k) {
            keys.push(k);
            id_rows.push(row);
        }
        triples.push(((keys.len() - 1) as u32, r.users[row as usize], row));
    }
    drop(order);
    r.users = Vec::new();
    let entities = keys.len() as u64;
    let label_column = StringArray::from_iter(keys.iter().map(|k| labels.get(k).map(|l| &**l)));
    let items = RecordBatch::try_new(
        items_schema(),
        vec![
            Arc::new(UInt64Array::from(keys)) as ArrayRef,
            arrow::compute::take(&ids, &UInt32Array::from(id_rows), None)?,
            Arc::new(label_column),
        ],
    )?;
    let columns = pair_columns(triples, &r.strength);
    let pairs = columns.0.len() as u64;
    let pairs_table = pair_table(columns, pairs_schema("item", "user"))?;
    Ok((vec![items, pairs_table], entities, pairs))
}

// ---------------------------------------------------------------------------
// Reading back

/// One split's part of a user shard, as staged.
#[derive(Debug, Clone, PartialEq)]
pub struct UserPartial {
    /// (split, chunk)
    pub split: (u32, u32),
    /// Increasing.
    pub keys: UInt64Array,
    pub ids: StringArray,
    pub last_ms: Int64Array,
    pub events: UInt64Array,
    /// Events without an order id.
    pub loose: UInt64Array,
    pub monetary: Float64Array,
    /// (user position, order hash), sorted, distinct.
    pub order_users: UInt32Array,
    pub orders: UInt64Array,
    /// (user position, item key, strength), sorted by (user, item), distinct.
    pub pair_users: UInt32Array,
    pub pair_items: UInt64Array,
    pub pair_strength: Float64Array,
}

/// One split's part of an item shard, as staged.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemPartial {
    /// (split, chunk)
    pub split: (u32, u32),
    /// Increasing.
    pub keys: UInt64Array,
    pub ids: StringArray,
    /// Null where the split's rows had no label.
    pub labels: StringArray,
    /// (item position, user key, strength), sorted by (item, user), distinct.
    pub pair_items: UInt32Array,
    pub pair_users: UInt64Array,
    pub pair_strength: Float64Array,
}

fn check_positions(positions: &UInt32Array, len: usize, url: &str) -> Result<(), WorkerError> {
    match positions.values().iter().find(|&&p| p as usize >= len) {
        Some(p) => Err(WorkerError::Staged {
            url: url.to_string(),
            detail: format!("position {p} of a table of {len}"),
        }),
        None => Ok(()),
    }
}

fn check_sorted(keys: &UInt64Array, url: &str) -> Result<(), WorkerError> {
    if keys.values().windows(2).any(|w| w[0] >= w[1]) {
        return Err(WorkerError::Staged {
            url: url.to_string(),
            detail: "keys are not increasing".into(),
        });
    }
    Ok(())
}

impl UserPartial {
    fn decode(split: (u32, u32), bytes: &Bytes, url: &str) -> Result<UserPartial, WorkerError> {
        let t = decode_tables(
            bytes,
            &[
                users_schema(),
                orders_schema(),
                pairs_schema("user", "item"),
            ],
            url,
        )?;
        let p = UserPartial {
            split,
            keys: t[0].column(0).as_primitive::<UInt64Type>().clone(),
            ids: t[0].column(1).as_string::<i32>().clone(),
            last_ms: t[0].column(2).as_primitive::<Int64Type>().clone(),
            events: t[0].column(3).as_primitive::<UInt64Type>().clone(),
            loose: t[0].column(4).as_primitive::<UInt64Type>().clone(),
            monetary: t[0].column(5).as_primitive::<Float64Type>().clone(),
            order_users: t[1].column(0).as_primitive::<UInt32Type>().clone(),
            orders: t[1].column(1).as_primitive::<UInt64Type>().clone(),
            pair_users: t[2].column(0).as_primitive::<UInt32Type>().clone(),
            pair_items: t[2].column(1).as_primitive::<UInt64Type>().clone(),
            pair_strength: t[2].column(2).as_primitive::<Float64Type>().clone(),
        };
        check_sorted(&p.keys, url)?;
        check_positions(&p.order_users, p.keys.len(), url)?;
        check_positions(&p.pair_users, p.keys.len(), url)?;
        Ok(p)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl ItemPartial {
    fn decode(split: (u32, u32), bytes: &Bytes, url: &str) -> Result<ItemPartial, WorkerError> {
        let t = decode_tables(bytes, &[items_schema(), pairs_schema("item", "user")], url)?;
        let p = ItemPartial {
            split,
            keys: t[0].column(0).as_primitive::<UInt64Type>().clone(),
            ids: t[0].column(1).as_string::<i32>().clone(),
            labels: t[0].column(2).as_string::<i32>().clone(),
            pair_items: t[1].column(0).as_primitive::<UInt32Type>().clone(),
            pair_users: t[1].column(1).as_primitive::<UInt64Type>().clone(),
            pair_strength: t[1].column(2).as_primitive::<Float64Type>().clone(),
        };
        check_sorted(&p.keys, url)?;
        check_positions(&p.pair_items, p.keys.len(), url)?;
        if p.ids.null_count() > 0 {
            return Err(WorkerError::Staged {
                url: url.to_string(),
                detail: "an item without an id".into(),
            });
        }
        Ok(p)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// How a staged object is decoded: from its (split, chunk), bytes and URL.
type Decode<T> = fn((u32, u32), &Bytes, &str) -> Result<T, WorkerError>;

/// Every object of a shard's folder, decoded, in (split, chunk) order.
async fn read_partials<T>(prefix: &Location, decode: Decode<T>) -> Result<Vec<T>, WorkerError> {
    let mut out = Vec::new();
    for (split, loc) in list_splits(prefix).await? {
        let bytes = loc.get().await?;
        out.push(decode(split, &bytes, &loc.url())?);
    }
    Ok(out)
}

/// Every split's part of user shard `shard`, in (split, chunk) order (none when
/// no split routed a row to it).
pub async fn read_user_partials(
    staging: &Location,
    shard: u32,
) -> Result<Vec<UserPartial>, WorkerError> {
    read_partials(&user_prefix(staging, shard), UserPartial::decode).await
}

/// Every split's part of item shard `shard`, in (split, chunk) order.
pub async fn read_item_partials(
    staging: &Location,
    shard: u32,
) -> Result<Vec<ItemPartial>, WorkerError> {
    read_partials(&item_prefix(staging, shard), ItemPartial::decode).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_store::resolve;

    fn row<'a>(
        user: &'a str,
        t: i64,
        order: &'a str,
        item: Option<&'a str>,
        q: f64,
    ) -> KeptRow<'a> {
        KeptRow {
            user,
            time_ms: t,
            order: Some(order),
            item,
            quantity: q,
            monetary: q * 1.5,
            weight: 1.0,
            item_label: item.map(|_| "label"),
        }
    }

    #[tokio::test]
    async fn a_split_stages_each_shards_aggregates_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let staging = resolve(&dir.path().display().to_string()).unwrap();
        let shards = 3;
        let mut p = SplitPartials::new(7, shards, true, &staging);
        let rows = [
            row("ann", 10, "o1", Some("x"), 2.0),
            row("ann", 30, "o1", Some("x"), 1.0),
            row("ann", 20, "o2", Some("y"), 4.0),
            row("Ann", 5, "o3", None, 1.0),
            row("bob", 40, "o4", Some("x"), 0.5),
        ];
        for r in &rows {
            p.push(r).unwrap();
        }
        let files = p.write().await.unwrap();
        let (mut users, mut pairs) = (0, 0);
        for f in &files.users {
            users += f.entities;
            pairs += f.pairs;
        }
        assert_eq!((users, pairs), (3, 3));
        assert_eq!(files.items.iter().map(|f| f.entities).sum::<u64>(), 2);

        let mut seen = 0;
        for shard in 0..shards {
            for part in read_user_partials(&staging, shard).await.unwrap() {
                assert_eq!(part.split, (7, 0));
                for i in 0..part.len() {
                    seen += 1;
                    let id = part.ids.value(i);
                    assert_eq!(id_key(id), part.keys.value(i));
                    assert_eq!(shard_of_key(part.keys.value(i), shards), shard);
                    let (last, events, money, orders) = match id {
                        "ann" => (30, 3, 10.5, 2),
                        "Ann" => (5, 1, 1.5, 1),
                        "bob" => (40, 1, 0.75, 1),
                        other => panic!("{other}"),
                    };
                    assert_eq!(part.last_ms.value(i), last);
                    assert_eq!(part.events.value(i), events);
                    assert_eq!(part.monetary.value(i), money);
                    let n = part
                        .order_users
                        .values()
                        .iter()
                        .filter(|&&u| u as usize == i)
                        .count();
                    assert_eq!(n, orders, "{id}");
                    if id == "ann" {
                        let mine: Vec<(u64, f64)> = (0..part.pair_users.len())
                            .filter(|&j| part.pair_users.value(j) as usize == i)
                            .map(|j| (part.pair_items.value(j), part.pair_strength.value(j)))
                            .collect();
                        let mut want = vec![(id_key("x"), 3.0), (id_key("y"), 4.0)];
                        want.sort_by_key(|w| w.0);
                        assert_eq!(mine, want);
                    }
                }
            }
            for part in read_item_partials(&staging, shard).await.unwrap() {
                for i in 0..part.len() {
                    assert_eq!(part.labels.value(i), "label");
                    let users: Vec<(u64, f64)> = (0..part.pair_items.len())
                        .filter(|&j| part.pair_items.value(j) as usize == i)
                        .map(|j| (part.pair_users.value(j), part.pair_strength.value(j)))
                        .collect();
                    match part.ids.value(i) {
                        "x" => {
                            let mut want = vec![(id_key("ann"), 3.0), (id_key("bob"), 0.5)];
                            want.sort_by_key(|w| w.0);
                            assert_eq!(users, want);
                        }
                        "y" => assert_eq!(users, vec![(id_key("ann"), 4.0)]),
                        other => panic!("{other}"),
                    }
                }
            }
        }
        assert_eq!(seen, 3);
        // a retried split overwrites its objects
        let mut again = SplitPartials::new(7, shards, true, &staging);
        for r in &rows {
            again.push(r).unwrap();
        }
        again.write().await.unwrap();
        let total: usize =
            futures::future::join_all((0..shards).map(|s| read_user_partials(&staging, s)))
                .await
                .into_iter()
                .map(|r| r.unwrap().iter().map(UserPartial::len).sum::<usize>())
                .sum();
        assert_eq!(total, 3);
    }

    #[tokio::test]
    async fn a_foreign_object_in_a_shard_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let staging = resolve(&dir.path().display().to_string()).unwrap();
        let loc = split_object(&user_prefix(&staging, 0), 0, 0);
        loc.put(Bytes::from_static(b"PAR1 not ours")).await.unwrap();
        let err = read_user_partials(&staging, 0)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&loc.url()) && err.contains("staging header"),
            "{err}"
        );
        // an item object where a user object belongs
        let mut p = SplitPartials::new(0, 1, true, &staging);
        p.push(&row("u", 1, "o", Some("i"), 1.0)).unwrap();
        p.write().await.unwrap();
        let item = split_object(&item_prefix(&staging, 0), 0, 0)
            .get()
            .await
            .unwrap();
        loc.put(item).await.unwrap();
        let err = read_user_partials(&staging, 0)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("tables, expected 3"), "{err}");
    }
}
