//! The staged row format: what ingest writes and shard loading reads.
//!
//! Every input split routes its cleaned rows to user shards and writes one Parquet
//! file per non-empty shard:
//!
//! ```text
//! {staging}/ingest/shard-{shard:05}/split-{split:05}.parquet
//! ```
//!
//! When the job learns ALS factors (`features.als = true`), every kept row with an
//! item is also routed to its item shard (`shard_of(item, shards)`, the same hash
//! and shard count as users) as an (item, user, strength) triple, so that the item
//! side of ALS can be solved shard by shard too:
//!
//! ```text
//! {staging}/items/shard-{shard:05}/split-{split:05}.parquet
//! ```
//!
//! Each file is written with a single `put`, so a retried split overwrites the same
//! objects and ingest is idempotent. A shard is the concatenation of its files in
//! path order (= split order), rows in file order, so what a shard holds does not
//! depend on which worker ingested which split.

use std::sync::{Arc, OnceLock};

use arrow::array::{ArrayRef, Float64Array, Int64Array, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use shoal_proto::Location;
use shoal_proto::hash::shard_of;

use crate::error::WorkerError;

/// Column names of the staged schema, in order.
pub const USER: &str = "user";
pub const TIME_MS: &str = "time_ms";
pub const ORDER: &str = "order";
pub const ITEM: &str = "item";
pub const QUANTITY: &str = "quantity";
pub const MONETARY: &str = "monetary";
pub const WEIGHT: &str = "weight";
pub const ITEM_LABEL: &str = "item_label";
/// Column of the item-routed schema (with [`ITEM`] and [`USER`]).
pub const STRENGTH: &str = "strength";

/// How many staged files of one split are uploaded at the same time.
const PUT_CONCURRENCY: usize = 16;

/// Rows per batch when reading staged files back.
const READ_BATCH_ROWS: usize = 64 * 1024;

/// The schema of every staged file:
///
/// | column       | type    | null | meaning                                               |
/// |--------------|---------|------|-------------------------------------------------------|
/// | `user`       | Utf8    | no   | user id as read (integer text with `user_as_integer`) |
/// | `time_ms`    | Int64   | no   | event time, ms since the Unix epoch (UTC)             |
/// | `order`      | Utf8    | yes  | order id; null without an order column                |
/// | `item`       | Utf8    | yes  | item id; null without an item column                  |
/// | `quantity`   | Float64 | no   | 1.0 without a quantity column                         |
/// | `monetary`   | Float64 | no   | `amount`, or `quantity * price`                       |
/// | `weight`     | Float64 | no   | event weight (`[input.events]`); 1.0 without events   |
/// | `item_label` | Utf8    | yes  | `input.columns.item_label`; null without it or blank  |
///
/// The strength of a row's (user, item) interaction is `weight * quantity`, the
/// same f64 product [`item_staged_schema`]'s `strength` holds.
pub fn staged_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new(USER, DataType::Utf8, false),
                Field::new(TIME_MS, DataType::Int64, false),
                Field::new(ORDER, DataType::Utf8, true),
                Field::new(ITEM, DataType::Utf8, true),
                Field::new(QUANTITY, DataType::Float64, false),
                Field::new(MONETARY, DataType::Float64, false),
                Field::new(WEIGHT, DataType::Float64, false),
                Field::new(ITEM_LABEL, DataType::Utf8, true),
            ]))
        })
        .clone()
}

/// The schema of every item-routed file (written only with `features.als = true`):
///
/// | column     | type    | null | meaning                                            |
/// |------------|---------|------|----------------------------------------------------|
/// | `item`     | Utf8    | no   | item id, as in the user-routed `item` column       |
/// | `user`     | Utf8    | no   | user id, as in the user-routed `user` column       |
/// | `strength` | Float64 | no   | `weight * quantity` of the row, that exact product |
pub fn item_staged_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new(ITEM, DataType::Utf8, false),
                Field::new(USER, DataType::Utf8, false),
                Field::new(STRENGTH, DataType::Float64, false),
            ]))
        })
        .clone()
}

/// The folder holding every staged file of `shard`.
pub fn shard_prefix(staging: &Location, shard: u32) -> Location {
    staging.child(&format!("ingest/shard-{shard:05}"))
}

/// The staged file of `split` for `shard`.
pub fn split_file(staging: &Location, shard: u32, split: u32) -> Location {
    shard_prefix(staging, shard).child(&split_file_name(split))
}

/// The folder holding every item-routed file of item shard `shard`.
pub fn item_shard_prefix(staging: &Location, shard: u32) -> Location {
    staging.child(&format!("items/shard-{shard:05}"))
}

/// The item-routed file of `split` for item shard `shard`.
pub fn item_split_file(staging: &Location, shard: u32, split: u32) -> Location {
    item_shard_prefix(staging, shard).child(&split_file_name(split))
}

fn split_file_name(split: u32) -> String {
    format!("split-{split:05}.parquet")
}

fn is_split_file_name(name: &str) -> bool {
    name.strip_prefix("split-")
        .and_then(|rest| rest.strip_suffix(".parquet"))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// One cleaned row on its way to a shard. Strings are borrowed: the writer copies
/// them straight into its column buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StagedRow<'a> {
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

impl StagedRow<'_> {
    /// The strength of the row's (user, item) interaction: `weight * quantity`.
    pub fn strength(&self) -> f64 {
        self.weight * self.quantity
    }
}

/// The column buffers of one shard.
struct ShardBuffer {
    user: StringBuilder,
    time_ms: Vec<i64>,
    order: StringBuilder,
    item: StringBuilder,
    quantity: Vec<f64>,
    monetary: Vec<f64>,
    weight: Vec<f64>,
    item_label: StringBuilder,
}

impl ShardBuffer {
    fn new() -> Self {
        ShardBuffer {
            user: StringBuilder::new(),
            time_ms: Vec::new(),
            order: StringBuilder::new(),
            item: StringBuilder::new(),
            quantity: Vec::new(),
            monetary: Vec::new(),
            weight: Vec::new(),
            item_label: StringBuilder::new(),
        }
    }

    fn push(&mut self, row: &StagedRow<'_>) {
        self.user.append_value(row.user);
        self.time_ms.push(row.time_ms);
        self.order.append_option(row.order);
        self.item.append_option(row.item);
        self.quantity.push(row.quantity);
        self.monetary.push(row.monetary);
        self.weight.push(row.weight);
        self.item_label.append_option(row.item_label);
    }

    fn len(&self) -> usize {
        self.time_ms.len()
    }

    fn finish(mut self) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.user.finish()),
            Arc::new(Int64Array::from(self.time_ms)),
            Arc::new(self.order.finish()),
            Arc::new(self.item.finish()),
            Arc::new(Float64Array::from(self.quantity)),
            Arc::new(Float64Array::from(self.monetary)),
            Arc::new(Float64Array::from(self.weight)),
            Arc::new(self.item_label.finish()),
        ];
        RecordBatch::try_new(staged_schema(), columns)
    }
}

/// The column buffers of one item shard.
struct ItemBuffer {
    item: StringBuilder,
    user: StringBuilder,
    strength: Vec<f64>,
}

impl ItemBuffer {
    fn new() -> Self {
        ItemBuffer {
            item: StringBuilder::new(),
            user: StringBuilder::new(),
            strength: Vec::new(),
        }
    }

    fn push(&mut self, item: &str, row: &StagedRow<'_>) {
        self.item.append_value(item);
        self.user.append_value(row.user);
        self.strength.push(row.strength());
    }

    fn len(&self) -> usize {
        self.strength.len()
    }

    fn finish(mut self) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.item.finish()),
            Arc::new(self.user.finish()),
            Arc::new(Float64Array::from(self.strength)),
        ];
        RecordBatch::try_new(item_staged_schema(), columns)
    }
}

/// What [`SplitWriter::write`] put on the store for one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedFile {
    pub shard: u32,
    pub rows: u64,
    pub bytes: u64,
}

/// Everything [`SplitWriter::write`] put on the store, each list in shard order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StagedFiles {
    /// User-routed files ([`split_file`]).
    pub users: Vec<StagedFile>,
    /// Item-routed files ([`item_split_file`]); empty without item routing.
    pub items: Vec<StagedFile>,
}

/// Routes the rows of one split to per-shard buffers (`shard_of(user, shards)`), and
/// with item routing also to per-item-shard buffers (`shard_of(item, shards)`), then
/// writes one Parquet file per non-empty shard.
pub struct SplitWriter {
    split: u32,
    shards: u32,
    buffers: Vec<Option<ShardBuffer>>,
    /// Item shard buffers; `None` without item routing.
    items: Option<Vec<Option<ItemBuffer>>>,
    rows: u64,
    item_rows: u64,
}

impl SplitWriter {
    /// A writer for split `split` of a job with `shards` user shards (at least 1).
    pub fn new(split: u32, shards: u32) -> Self {
        assert!(shards > 0, "a job has at least one shard");
        SplitWriter {
            split,
            shards,
            buffers: (0..shards).map(|_| None).collect(),
            items: None,
            rows: 0,
            item_rows: 0,
        }
    }

    /// Also routes every row with an item to its item shard (for ALS), written as
    /// [`item_split_file`]s with [`item_staged_schema`].
    pub fn with_item_routing(mut self) -> Self {
        self.items = Some((0..self.shards).map(|_| None).collect());
        self
    }

    /// Whether rows are also routed to item shards.
    pub fn routes_items(&self) -> bool {
        self.items.is_some()
    }

    /// Buffers `row` in the shard of its user and, with item routing and an item,
    /// in the item shard of its item.
    pub fn push(&mut self, row: StagedRow<'_>) {
        let shard = shard_of(row.user, self.shards) as usize;
        self.buffers[shard]
            .get_or_insert_with(ShardBuffer::new)
            .push(&row);
        self.rows += 1;
        if let Some(items) = self.items.as_mut()
            && let Some(item) = row.item.filter(|i| !i.is_empty())
        {
            let shard = shard_of(item, self.shards) as usize;
            items[shard]
                .get_or_insert_with(ItemBuffer::new)
                .push(item, &row);
            self.item_rows += 1;
        }
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Rows routed to item shards so far (0 without item routing).
    pub fn item_rows(&self) -> u64 {
        self.item_rows
    }

    /// Encodes each non-empty shard as one Parquet file and puts it at
    /// [`split_file`] (and each non-empty item shard at [`item_split_file`]),
    /// overwriting what an earlier attempt of the split wrote. Returns the files
    /// written, in shard order.
    pub async fn write(self, staging: &Location) -> Result<StagedFiles, WorkerError> {
        let split = self.split;
        // (is an item file, location, what was written, bytes)
        let mut encoded = Vec::new();
        // (is an item file, shard, rows, batch) of every non-empty buffer
        let users = self
            .buffers
            .into_iter()
            .enumerate()
            .filter_map(|(shard, b)| {
                let b = b.filter(|b| b.len() > 0)?;
                Some((false, shard as u32, b.len() as u64, b.finish()))
            });
        let items = self
            .items
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(shard, b)| {
                let b = b.filter(|b| b.len() > 0)?;
                Some((true, shard as u32, b.len() as u64, b.finish()))
            });
        for (is_item, shard, rows, batch) in users.chain(items) {
            let loc = if is_item {
                item_split_file(staging, shard, split)
            } else {
                split_file(staging, shard, split)
            };
            let (file, bytes) = encode_file(&loc, shard, rows, batch)?;
            encoded.push((is_item, loc, file, bytes));
        }
        // (encoded in shard order, users then items)
        let mut files = StagedFiles::default();
        let mut puts = Vec::with_capacity(encoded.len());
        for (is_item, loc, file, bytes) in encoded {
            puts.push((loc, bytes));
            if is_item {
                files.items.push(file);
            } else {
                files.users.push(file);
            }
        }
        put_all(puts).await?;
        Ok(files)
    }
}

/// Puts every `(location, bytes)`, [`PUT_CONCURRENCY`] at a time; the first
/// failure is the error.
pub(crate) async fn put_all(files: Vec<(Location, Bytes)>) -> Result<(), WorkerError> {
    futures::stream::iter(files)
        .map(|(loc, bytes)| async move { loc.put(bytes).await })
        .buffer_unordered(PUT_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Encodes one shard's batch as the Parquet bytes of the file at `loc`.
fn encode_file(
    loc: &Location,
    shard: u32,
    rows: u64,
    batch: Result<RecordBatch, ArrowError>,
) -> Result<(StagedFile, Bytes), WorkerError> {
    let batch = batch.map_err(|source| WorkerError::Arrow {
        file: loc.url(),
        source,
    })?;
    let bytes = encode_parquet(&batch).map_err(|source| WorkerError::Parquet {
        file: loc.url(),
        source,
    })?;
    let file = StagedFile {
        shard,
        rows,
        bytes: bytes.len() as u64,
    };
    Ok((file, bytes))
}

pub(crate) fn encode_parquet(batch: &RecordBatch) -> Result<Bytes, parquet::errors::ParquetError> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props))?;
    writer.write(batch)?;
    Ok(Bytes::from(writer.into_inner()?))
}

/// Reads every staged row of `shard`: its files in path order (= split order), rows
/// in file order, each batch with exactly [`staged_schema`]. An empty `Vec` when no
/// split routed a row to the shard.
pub async fn read_shard(staging: &Location, shard: u32) -> Result<Vec<RecordBatch>, WorkerError> {
    read_staged(
        &shard_prefix(staging, shard),
        &staged_schema(),
        "a staged shard file",
    )
    .await
}

/// Reads every item-routed row of item shard `shard`: its files in path order
/// (= split order), rows in file order, each batch with exactly
/// [`item_staged_schema`]. An empty `Vec` when no split routed a row to the shard
/// (or the job does not route items).
pub async fn read_item_shard(
    staging: &Location,
    shard: u32,
) -> Result<Vec<RecordBatch>, WorkerError> {
    read_staged(
        &item_shard_prefix(staging, shard),
        &item_staged_schema(),
        "an item-routed shard file",
    )
    .await
}

/// The split files below `prefix`, in path order, each checked against `expected`;
/// `what` names such a file in errors.
async fn read_staged(
    prefix: &Location,
    expected: &SchemaRef,
    what: &str,
) -> Result<Vec<RecordBatch>, WorkerError> {
    let mut batches = Vec::new();
    for meta in prefix.list().await? {
        // Only our own files: object stores may show other objects (e.g. temporary
        // uploads) below the prefix.
        if !meta.location.filename().is_some_and(is_split_file_name) {
            continue;
        }
        let file = prefix.at(meta.location);
        let url = file.url();
        let bytes = file.get().await?;
        let parquet_err = |source| WorkerError::Parquet {
            file: url.clone(),
            source,
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .map_err(parquet_err)?
            .with_batch_size(READ_BATCH_ROWS);
        check_schema(builder.schema(), expected, what).map_err(|source| WorkerError::Arrow {
            file: url.clone(),
            source,
        })?;
        for batch in builder.build().map_err(parquet_err)? {
            let batch = batch.map_err(|source| WorkerError::Arrow {
                file: url.clone(),
                source,
            })?;
            let batch = RecordBatch::try_new(expected.clone(), batch.columns().to_vec()).map_err(
                |source| WorkerError::Arrow {
                    file: url.clone(),
                    source,
                },
            )?;
            batches.push(batch);
        }
    }
    Ok(batches)
}

/// Field names, types and nullability must match; metadata may differ.
fn check_schema(found: &Schema, expected: &Schema, what: &str) -> Result<(), ArrowError> {
    let same = found.fields().len() == expected.fields().len()
        && found.fields().iter().zip(expected.fields()).all(|(f, e)| {
            f.name() == e.name()
                && f.data_type() == e.data_type()
                && f.is_nullable() == e.is_nullable()
        });
    if same {
        return Ok(());
    }
    let show = |s: &Schema| {
        s.fields()
            .iter()
            .map(|f| {
                format!(
                    "{} {}{}",
                    f.name(),
                    f.data_type(),
                    if f.is_nullable() { "" } else { " not null" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(ArrowError::SchemaError(format!(
        "not {what}: columns are [{}], expected [{}]; the staging prefix holds files of another shoal version or another program",
        show(found),
        show(expected)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, Int64Type};
    use shoal_proto::store::resolve;

    fn staging_in(dir: &tempfile::TempDir) -> Location {
        resolve(&dir.path().join("staging").display().to_string()).unwrap()
    }

    /// user, time_ms, order, item, quantity, monetary, weight, item_label
    type Row = (
        String,
        i64,
        Option<String>,
        Option<String>,
        f64,
        f64,
        f64,
        Option<String>,
    );

    fn rows_of(batches: &[RecordBatch]) -> Vec<Row> {
        let mut out = Vec::new();
        for b in batches {
            let user = b.column(0).as_string::<i32>();
            let time = b.column(1).as_primitive::<Int64Type>();
            let order = b.column(2).as_string::<i32>();
            let item = b.column(3).as_string::<i32>();
            let qty = b.column(4).as_primitive::<Float64Type>();
            let money = b.column(5).as_primitive::<Float64Type>();
            let weight = b.column(6).as_primitive::<Float64Type>();
            let label = b.column(7).as_string::<i32>();
            for i in 0..b.num_rows() {
                out.push((
                    user.value(i).to_string(),
                    time.value(i),
                    order.is_valid(i).then(|| order.value(i).to_string()),
                    item.is_valid(i).then(|| item.value(i).to_string()),
                    qty.value(i),
                    money.value(i),
                    weight.value(i),
                    label.is_valid(i).then(|| label.value(i).to_string()),
                ));
            }
        }
        out
    }

    /// item, user, strength
    type ItemRow = (String, String, f64);

    fn item_rows_of(batches: &[RecordBatch]) -> Vec<ItemRow> {
        let mut out = Vec::new();
        for b in batches {
            assert_eq!(b.schema(), item_staged_schema());
            let item = b.column(0).as_string::<i32>();
            let user = b.column(1).as_string::<i32>();
            let strength = b.column(2).as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                out.push((
                    item.value(i).to_string(),
                    user.value(i).to_string(),
                    strength.value(i),
                ));
            }
        }
        out
    }

    fn sample_rows(n: usize) -> Vec<Row> {
        (0..n)
            .map(|i| {
                (
                    format!("u{}", i % 37),
                    1_000 * i as i64,
                    (i % 3 != 0).then(|| format!("o{i}")),
                    // every 5th row has no item, every 13th an empty one
                    (i % 5 != 0).then(|| {
                        if i % 13 == 0 {
                            String::new()
                        } else {
                            format!("i{}", i % 11)
                        }
                    }),
                    (i % 4) as f64 + 1.0,
                    i as f64 * 0.5,
                    [1.0, 0.1, 0.3, 2.5, 0.0][i % 5],
                    (i % 7 != 0).then(|| format!("label {}", i % 11)),
                )
            })
            .collect()
    }

    fn push_all(writer: &mut SplitWriter, rows: &[Row]) {
        for r in rows {
            writer.push(StagedRow {
                user: &r.0,
                time_ms: r.1,
                order: r.2.as_deref(),
                item: r.3.as_deref(),
                quantity: r.4,
                monetary: r.5,
                weight: r.6,
                item_label: r.7.as_deref(),
            });
        }
    }

    #[test]
    fn layout_is_zero_padded_per_shard_and_split() {
        let staging = resolve("/tmp/x/staging").unwrap();
        assert_eq!(
            split_file(&staging, 3, 12).url(),
            "file:///tmp/x/staging/ingest/shard-00003/split-00012.parquet"
        );
        assert_eq!(
            shard_prefix(&staging, 65_535).url(),
            "file:///tmp/x/staging/ingest/shard-65535"
        );
        assert!(is_split_file_name("split-00012.parquet"));
        assert!(!is_split_file_name("split-00012.parquet#1"));
        assert!(!is_split_file_name("other.parquet"));
        assert_eq!(
            item_split_file(&staging, 3, 12).url(),
            "file:///tmp/x/staging/items/shard-00003/split-00012.parquet"
        );
        assert_eq!(
            item_shard_prefix(&staging, 65_535).url(),
            "file:///tmp/x/staging/items/shard-65535"
        );
    }

    #[test]
    fn schemas_append_weight_and_label_and_name_the_item_columns() {
        let names = |s: SchemaRef| {
            s.fields()
                .iter()
                .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
                .collect::<Vec<_>>()
        };
        let user = names(staged_schema());
        assert_eq!(
            user.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
            [
                USER, TIME_MS, ORDER, ITEM, QUANTITY, MONETARY, WEIGHT, ITEM_LABEL
            ]
        );
        assert_eq!(user[6], (WEIGHT.into(), DataType::Float64, false));
        assert_eq!(user[7], (ITEM_LABEL.into(), DataType::Utf8, true));
        assert_eq!(
            names(item_staged_schema()),
            [
                (ITEM.into(), DataType::Utf8, false),
                (USER.into(), DataType::Utf8, false),
                (STRENGTH.into(), DataType::Float64, false),
            ]
        );
    }

    #[tokio::test]
    async fn rows_round_trip_by_shard_in_split_order() {
        let dir = tempfile::tempdir().unwrap();
        let staging = staging_in(&dir);
        let shards = 4;
        let first = sample_rows(500);
        let second: Vec<Row> = sample_rows(300)
            .into_iter()
            .map(|mut r| {
                r.1 += 10_000_000;
                r
            })
            .collect();
        // Split 1 is written before split 0: reading must still follow split order.
        let mut w1 = SplitWriter::new(1, shards);
        push_all(&mut w1, &second);
        w1.write(&staging).await.unwrap();
        let mut w0 = SplitWriter::new(0, shards);
        push_all(&mut w0, &first);
        assert_eq!(w0.rows(), 500);
        let files = w0.write(&staging).await.unwrap();
        assert_eq!(files.users.iter().map(|f| f.rows).sum::<u64>(), 500);
        assert!(files.users.windows(2).all(|w| w[0].shard < w[1].shard));
        assert!(files.items.is_empty(), "no item routing unless asked");
        assert!(read_item_shard(&staging, 0).await.unwrap().is_empty());

        let mut total = 0;
        for shard in 0..shards {
            let batches = read_shard(&staging, shard).await.unwrap();
            assert!(batches.iter().all(|b| b.schema() == staged_schema()));
            let got = rows_of(&batches);
            let want: Vec<Row> = first
                .iter()
                .chain(&second)
                .filter(|r| shard_of(&r.0, shards) == shard)
                .cloned()
                .collect();
            assert_eq!(got, want, "shard {shard}");
            total += got.len();
        }
        assert_eq!(total, 800);
    }

    #[tokio::test]
    async fn rewriting_a_split_overwrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let staging = staging_in(&dir);
        let rows = sample_rows(100);
        for _ in 0..2 {
            let mut w = SplitWriter::new(7, 2);
            push_all(&mut w, &rows);
            w.write(&staging).await.unwrap();
        }
        let mut n = 0;
        for shard in 0..2 {
            n += rows_of(&read_shard(&staging, shard).await.unwrap()).len();
        }
        assert_eq!(n, 100, "a retried split must not duplicate rows");
    }

    #[tokio::test]
    async fn item_routing_stages_item_user_strength_by_item_shard_in_split_order() {
        let dir = tempfile::tempdir().unwrap();
        let staging = staging_in(&dir);
        let shards = 4;
        let first = sample_rows(500);
        let second: Vec<Row> = sample_rows(300)
            .into_iter()
            .map(|mut r| {
                r.0 = format!("{}-b", r.0);
                r
            })
            .collect();
        let with_item = |rows: &[Row]| {
            rows.iter()
                .filter(|r| r.3.as_deref().is_some_and(|i| !i.is_empty()))
                .count() as u64
        };
        // Written twice (a retried split overwrites) and out of split order.
        for _ in 0..2 {
            let mut w1 = SplitWriter::new(1, shards).with_item_routing();
            assert!(w1.routes_items());
            push_all(&mut w1, &second);
            assert_eq!(w1.item_rows(), with_item(&second));
            w1.write(&staging).await.unwrap();
        }
        let mut w0 = SplitWriter::new(0, shards).with_item_routing();
        push_all(&mut w0, &first);
        assert_eq!(w0.rows(), 500);
        let files = w0.write(&staging).await.unwrap();
        assert_eq!(files.users.iter().map(|f| f.rows).sum::<u64>(), 500);
        assert_eq!(
            files.items.iter().map(|f| f.rows).sum::<u64>(),
            with_item(&first)
        );
        assert!(files.items.windows(2).all(|w| w[0].shard < w[1].shard));
        assert!(files.items.iter().all(|f| f.bytes > 0));

        let mut total = 0;
        for shard in 0..shards {
            // The user side is unchanged by item routing.
            let want_users: Vec<Row> = first
                .iter()
                .chain(&second)
                .filter(|r| shard_of(&r.0, shards) == shard)
                .cloned()
                .collect();
            assert_eq!(
                rows_of(&read_shard(&staging, shard).await.unwrap()),
                want_users
            );

            let got = item_rows_of(&read_item_shard(&staging, shard).await.unwrap());
            let want: Vec<ItemRow> = first
                .iter()
                .chain(&second)
                .filter_map(|r| {
                    let item = r.3.as_deref().filter(|i| !i.is_empty())?;
                    (shard_of(item, shards) == shard)
                        .then(|| (item.to_string(), r.0.clone(), r.6 * r.4))
                })
                .collect();
            assert_eq!(got.len(), want.len(), "item shard {shard}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!((&g.0, &g.1), (&w.0, &w.1), "item shard {shard}");
                assert_eq!(
                    g.2.to_bits(),
                    w.2.to_bits(),
                    "strength is exactly weight * quantity"
                );
            }
            total += got.len();
        }
        assert_eq!(total as u64, with_item(&first) + with_item(&second));
        assert!(total > 0 && total < 800, "some rows have no item");
    }

    #[tokio::test]
    async fn empty_shard_reads_as_no_batches() {
        let dir = tempfile::tempdir().unwrap();
        let staging = staging_in(&dir);
        assert!(read_shard(&staging, 0).await.unwrap().is_empty());
        assert!(read_item_shard(&staging, 0).await.unwrap().is_empty());
        let written = SplitWriter::new(0, 3)
            .with_item_routing()
            .write(&staging)
            .await
            .unwrap();
        assert_eq!(written, StagedFiles::default(), "no rows, no files");
        assert!(staging.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn foreign_file_in_a_shard_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let staging = staging_in(&dir);
        let batch = RecordBatch::try_from_iter([(
            "user",
            Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef,
        )])
        .unwrap();
        let bytes = encode_parquet(&batch).unwrap();
        let file = split_file(&staging, 0, 0);
        file.put(bytes).await.unwrap();
        let err = read_shard(&staging, 0).await.unwrap_err().to_string();
        assert!(
            err.contains(&file.url()) && err.contains("not a staged shard file"),
            "{err}"
        );
        // A user-routed file where an item-routed one belongs is foreign too.
        let mut w = SplitWriter::new(0, 1);
        push_all(&mut w, &sample_rows(3));
        w.write(&staging).await.unwrap();
        let user_file = split_file(&staging, 0, 0).get().await.unwrap();
        let misplaced = item_split_file(&staging, 0, 0);
        misplaced.put(user_file).await.unwrap();
        let err = read_item_shard(&staging, 0).await.unwrap_err().to_string();
        assert!(
            err.contains(&misplaced.url()) && err.contains("not an item-routed shard file"),
            "{err}"
        );
    }
}
