//! Ingest: read one input split, clean its rows, route them to user shards (and,
//! with `features.als = true`, the rows with an item to item shards too).
//!
//! A split is a whole CSV object (optionally gzip) or some row groups of a Parquet
//! object, always read through `object_store`. Every data row is counted: it is
//! either kept (and staged, see [`crate::staging`]) or dropped under exactly one
//! reason ([`DropReason`]), checked in a fixed order. Bad rows (malformed CSV records,
//! unparseable values, missing times) fail the split when `input.clean.on_bad_rows = "fail"`; cleaning drops
//! (missing users, cancellations, values below the minimums) never do.
//!
//! Each kept row carries its event weight (`[input.events]` by the value of
//! `input.columns.event`; 1.0 without an event column or for a blank value, which is
//! never a bad row) and its item label (`input.columns.item_label`, null when blank).

mod clean;
mod columns;
mod csv;
mod parquet;
mod time;

pub use clean::canonical_integer;
pub(crate) use clean::count_malformed;
pub(crate) use columns::{Num, Numbers, decoded, describe_text, find_column, numbers, user_text};
pub use time::{TimeParser, parse_iso_ms};

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arrow::array::ArrayRef;
use arrow::datatypes::{DataType, Schema};
use shoal_proto::pb;
use shoal_spec::spec::{Format, JobSpec};
use shoal_store::Location;
use shoal_store::resolve;
use tokio_util::sync::CancellationToken;

use crate::error::WorkerError;
use crate::staging::{RowSink, SplitPartials, StagedFiles};
use clean::Cleaner;
use columns::{Plan, Prepared};

/// Rows per decoded batch.
const BATCH_ROWS: usize = 8192;

/// Why a row was dropped. The checks run in this order and a row is counted under
/// the first reason that applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A CSV record with another number of fields than the header, or a read
    /// field that is not UTF-8.
    MalformedRow,
    MissingUser,
    BadUser,
    CancelledOrder,
    MissingTime,
    BadTime,
    BadQuantity,
    QuantityBelowMin,
    BadPrice,
    PriceAtOrBelowMin,
    BadAmount,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::MalformedRow,
        DropReason::MissingUser,
        DropReason::BadUser,
        DropReason::CancelledOrder,
        DropReason::MissingTime,
        DropReason::BadTime,
        DropReason::BadQuantity,
        DropReason::QuantityBelowMin,
        DropReason::BadPrice,
        DropReason::PriceAtOrBelowMin,
        DropReason::BadAmount,
    ];

    /// The key in `RowCounts.dropped`.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::MalformedRow => "malformed_row",
            DropReason::MissingUser => "missing_user",
            DropReason::BadUser => "bad_user",
            DropReason::CancelledOrder => "cancelled_order",
            DropReason::MissingTime => "missing_time",
            DropReason::BadTime => "bad_time",
            DropReason::BadQuantity => "bad_quantity",
            DropReason::QuantityBelowMin => "quantity_below_min",
            DropReason::PriceAtOrBelowMin => "price_at_or_below_min",
            DropReason::BadPrice => "bad_price",
            DropReason::BadAmount => "bad_amount",
        }
    }

    /// Bad rows fail the split under `on_bad_rows = "fail"`; the others are cleaning
    /// drops and never do.
    pub fn is_bad(self) -> bool {
        !matches!(
            self,
            DropReason::MissingUser
                | DropReason::CancelledOrder
                | DropReason::QuantityBelowMin
                | DropReason::PriceAtOrBelowMin
        )
    }
}

/// How the ingest of a job is watched and stopped: the job's cancellation, checked
/// before every row batch and before anything is staged, and live counters of the
/// rows read and bytes fetched over all of the job's splits on this worker.
#[derive(Debug, Clone, Default)]
pub struct IngestControl {
    /// The job (for the error a cancelled split returns).
    pub job: String,
    pub cancel: CancellationToken,
    pub rows_read: Arc<AtomicU64>,
    pub bytes_read: Arc<AtomicU64>,
}

impl IngestControl {
    pub(crate) fn check(&self) -> Result<(), WorkerError> {
        if self.cancel.is_cancelled() {
            return Err(WorkerError::Cancelled {
                job: self.job.clone(),
            });
        }
        Ok(())
    }
}

/// Reads split `split`, cleans its rows, aggregates the kept ones per user shard
/// (and with `features.als` per item shard) and writes them below `staging` (one
/// object per non-empty shard, overwriting an earlier attempt of the same split).
pub async fn ingest_split(
    spec: &JobSpec,
    split: &pb::Split,
    staging: &Location,
) -> Result<pb::SplitResult, WorkerError> {
    ingest_split_controlled(spec, split, staging, &IngestControl::default()).await
}

/// [`ingest_split`] that stops between row batches once `control.cancel` fires
/// (staging nothing) and counts what it reads into `control`'s counters.
pub async fn ingest_split_controlled(
    spec: &JobSpec,
    split: &pb::Split,
    staging: &Location,
    control: &IngestControl,
) -> Result<pb::SplitResult, WorkerError> {
    let partials = SplitPartials::new(
        split.index,
        spec.cluster.shards.max(1),
        spec.features.als,
        staging,
    );
    let (mut result, partials) = clean_split(spec, split, control, partials).await?;
    control.check()?;
    let files = partials.write().await?;
    tracing::debug!(
        split = split.index,
        object = %split.object,
        files = files.users.len(),
        item_files = files.items.len(),
        "ingested split"
    );
    result.staged = staged(&files);
    Ok(result)
}

/// Reads and cleans split `split`, handing every kept row to `sink`; returns the
/// split's counts and the sink.
pub async fn clean_split<S: RowSink + Send>(
    spec: &JobSpec,
    split: &pb::Split,
    control: &IngestControl,
    sink: S,
) -> Result<(pb::SplitResult, S), WorkerError> {
    control.check()?;
    let loc = resolve(&split.object)?;
    let mut reader = (Cleaner::new(spec, split, control, sink)?, None);
    let bytes_read = read_split(split, &loc, &mut reader).await?;
    let (cleaner, _) = reader;
    let (counts, sink) = cleaner.finish();
    Ok((
        pb::SplitResult {
            split: split.index,
            counts: Some(row_counts(counts.read, counts.kept, counts.dropped())),
            min_time_ms: if counts.kept > 0 {
                counts.min_time_ms
            } else {
                0
            },
            max_time_ms: if counts.kept > 0 {
                counts.max_time_ms
            } else {
                0
            },
            bytes_read,
            staged: Vec::new(),
            numeric_user_ids: counts.numeric_user_ids,
            fractional_integer_ids: counts.fractional_integer_ids,
            fractional_integer_example: counts.fractional_integer_example,
        },
        sink,
    ))
}

/// What a split staged per shard, for the coordinator's memory estimates.
fn staged(files: &StagedFiles) -> Vec<pb::StagedShard> {
    let side = |items: bool, f: &crate::staging::StagedFile| pb::StagedShard {
        shard: f.shard,
        items,
        entities: f.entities,
        pairs: f.pairs,
        bytes: f.bytes,
        entities_sketch: f.entities_sketch.to_bytes(),
        pairs_sketch: f.pairs_sketch.to_bytes(),
    };
    files
        .users
        .iter()
        .map(|f| side(false, f))
        .chain(files.items.iter().map(|f| side(true, f)))
        .collect()
}

/// The row counts of a split: `read`, `kept` and the rows dropped per reason
/// (reasons that dropped none left out).
pub(crate) fn row_counts(
    read: u64,
    kept: u64,
    dropped: impl IntoIterator<Item = (&'static str, u64)>,
) -> pb::RowCounts {
    pb::RowCounts {
        read,
        kept,
        dropped: dropped
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .map(|(reason, n)| (reason.to_string(), n))
            .collect(),
    }
}

/// Reads `split` (at `loc`) into `sink`, as CSV or Parquet; returns the bytes
/// fetched.
pub(crate) async fn read_split(
    split: &pb::Split,
    loc: &Location,
    sink: &mut (dyn Sink + Send),
) -> Result<u64, WorkerError> {
    match split_format(split)? {
        Format::Csv => csv::read_csv(split, loc, sink).await,
        Format::Parquet => {
            if split.gzip {
                return Err(WorkerError::InvalidRequest(format!(
                    "split {} of {}: gzip-compressed Parquet is not supported (Parquet compresses its pages itself)",
                    split.index, split.object
                )));
            }
            parquet::read_parquet(split, loc, sink).await
        }
    }
}

fn split_format(split: &pb::Split) -> Result<Format, WorkerError> {
    match split.format.trim().to_ascii_lowercase().as_str() {
        "csv" => Ok(Format::Csv),
        "parquet" => Ok(Format::Parquet),
        "" => Format::from_name(&split.object).map(|(f, _)| f).ok_or_else(|| {
            WorkerError::InvalidRequest(format!(
                "split {} of {}: no format given and none implied by the name (.csv, .csv.gz, .parquet)",
                split.index, split.object
            ))
        }),
        other => Err(WorkerError::InvalidRequest(format!(
            "split {} of {}: format `{other}` is not csv or parquet",
            split.index, split.object
        ))),
    }
}

// ---------------------------------------------------------------------------
// Readers

/// What the CSV and Parquet readers feed: it picks the columns it needs from a
/// file's schema, then takes the file's rows batch by batch.
pub(crate) trait Sink {
    /// The input column indices to read (sorted, distinct), from the schema of
    /// `file`; called once per file, before any batch.
    fn plan(&mut self, schema: &Schema, file: &str) -> Result<Vec<usize>, WorkerError>;
    /// Checks, before any row is read, that the planned columns have usable
    /// types (Parquet files carry them; CSV columns are all text).
    fn check_types(&self, schema: &Schema, file: &str) -> Result<(), WorkerError>;
    /// One batch of the planned columns (in projection order); `row_number` maps
    /// a row's index in read order (over the whole split) to its 1-based data
    /// row in the file.
    fn batch(
        &mut self,
        columns: &[ArrayRef],
        rows: usize,
        row_number: &dyn Fn(u64) -> u64,
    ) -> Result<(), WorkerError>;
    /// A record of a CSV file that is not a row of its header's columns (see
    /// [`csv`]): read, and dropped as a bad row. `row` is its 1-based data row;
    /// every row before it has been handed over.
    fn malformed(&mut self, row: u64, detail: String) -> Result<(), WorkerError>;
    /// The job's cancellation and counters.
    fn control(&self) -> &IngestControl;
    /// Staged objects ready to be put, which the reader puts between batches.
    fn ready(&mut self) -> Vec<(Location, bytes::Bytes)> {
        Vec::new()
    }
}

impl<S: RowSink> Sink for (Cleaner<'_, S>, Option<Plan>) {
    fn plan(&mut self, schema: &Schema, file: &str) -> Result<Vec<usize>, WorkerError> {
        let plan = Plan::new(self.0.spec(), schema, file)?;
        if let Some(user) = find_column(schema, &self.0.spec().input.columns.user) {
            self.0.numeric_user_ids |= match schema.field(user).data_type() {
                DataType::Dictionary(_, values) => values.is_numeric(),
                t => t.is_numeric(),
            };
        }
        let projection = plan.projection.clone();
        self.1 = Some(plan);
        Ok(projection)
    }

    fn check_types(&self, schema: &Schema, file: &str) -> Result<(), WorkerError> {
        Prepared::check_types(self.1.as_ref().expect("planned"), schema, file)
    }

    fn batch(
        &mut self,
        columns: &[ArrayRef],
        rows: usize,
        row_number: &dyn Fn(u64) -> u64,
    ) -> Result<(), WorkerError> {
        let plan = self.1.as_ref().expect("planned");
        let cols = Prepared::new(plan, columns, self.0.file())?;
        self.0.batch(plan, &cols, rows, row_number)
    }

    fn malformed(&mut self, row: u64, detail: String) -> Result<(), WorkerError> {
        self.0.malformed(row, detail)
    }

    fn control(&self) -> &IngestControl {
        self.0.control
    }

    fn ready(&mut self) -> Vec<(Location, bytes::Bytes)> {
        self.0.sink_mut().ready()
    }
}

/// Puts what `sink` has ready (between batches, so a split's staged chunks do not
/// pile up in memory).
pub(crate) async fn put_ready(sink: &mut (dyn Sink + Send)) -> Result<(), WorkerError> {
    let ready = sink.ready();
    if !ready.is_empty() {
        sink.control().check()?;
        crate::staging::put_all(ready).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::{KeptRow, RowSink, read_item_partials, read_user_partials};
    use ::parquet::arrow::ArrowWriter;
    use ::parquet::file::properties::WriterProperties;
    use arrow::array::{
        Float64Array, Float64Builder, Int64Builder, StringArray, TimestampMicrosecondArray,
    };
    use arrow::record_batch::RecordBatch;
    use bytes::Bytes;
    use chrono::TimeZone;
    use shoal_spec::hash::shard_of;
    use shoal_spec::spec::DEMO_SPEC;
    use shoal_spec::spec::{Columns, OnBadRows};
    use std::collections::{BTreeMap, BTreeSet};
    use tokio::io::AsyncWriteExt;

    const SHARDS: u32 = 4;

    /// The demo spec with integer user ids and a few shards.
    fn retail_spec() -> JobSpec {
        let mut spec = JobSpec::parse(DEMO_SPEC).unwrap();
        spec.input.user_as_integer = true;
        spec.cluster.shards = SHARDS;
        spec.validate().unwrap();
        spec
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
        chrono::Utc
            .with_ymd_and_hms(y, mo, d, h, mi, s)
            .unwrap()
            .timestamp_millis()
    }

    // One row per reason, in the order of the checks, and kept rows around them.
    const RETAIL_CSV: &str = "\
InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom
536366,22633,\"HAND WARMER, UNION JACK\",6,2010-12-01 08:28:00,1.85,17850.0,United Kingdom
536367,84879,\"ASSORTED \"\"COLOUR\"\" BIRD\",32,2010-12-01T08:34:00Z,1.69,13047,France
536368,22960,JAR,3,2010-12-01,4.25,,United Kingdom
536369,22961,JAR,3,2010-12-01,4.25,   ,United Kingdom
536370,22962,JAR,3,2010-12-01,4.25,12a,United Kingdom
536371,22963,JAR,3,2010-12-01,4.25,12.5,United Kingdom
C536372,22964,JAR,-1,2010-12-01 09:00,4.25,12583.0,France
536373,22965,JAR,3,,4.25,12583.0,France
536374,22966,JAR,3,yesterday,4.25,12583.0,France
536375,22967,JAR,many,2010-12-02 10:00,4.25,12583.0,France
536376,22968,JAR,,2010-12-02 10:00,4.25,12583.0,France
536377,22969,JAR,0,2010-12-02 10:00,4.25,12583.0,France
536378,22970,JAR,2,2010-12-02 10:00,,12583.0,France
536379,22971,JAR,2,2010-12-02 10:00,NaN,12583.0,France
536380,22972,JAR,2,2010-12-02 10:00,0.0,12583.0,France
536381,22973,JAR,2,2010-12-02 10:00,-1,12583.0,France
536382,,JAR,2,2011-12-09 12:50:00+01:00,3.5,12583.0,France
";

    type Row = (String, i64, Option<String>, Option<String>, f64, f64);

    /// The kept rows of RETAIL_CSV, written out by hand.
    fn retail_kept() -> Vec<Row> {
        let s = |x: &str| Some(x.to_string());
        vec![
            (
                "17850".into(),
                utc(2010, 12, 1, 8, 26, 0),
                s("536365"),
                s("85123A"),
                6.0,
                6.0 * 2.55,
            ),
            (
                "17850".into(),
                utc(2010, 12, 1, 8, 28, 0),
                s("536366"),
                s("22633"),
                6.0,
                6.0 * 1.85,
            ),
            (
                "13047".into(),
                utc(2010, 12, 1, 8, 34, 0),
                s("536367"),
                s("84879"),
                32.0,
                32.0 * 1.69,
            ),
            (
                "12583".into(),
                utc(2011, 12, 9, 11, 50, 0),
                s("536382"),
                None,
                2.0,
                2.0 * 3.5,
            ),
        ]
    }

    fn dropped(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn dropped_of(result: &pb::SplitResult) -> BTreeMap<String, u64> {
        result
            .counts
            .as_ref()
            .unwrap()
            .dropped
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    fn check_balance(result: &pb::SplitResult) {
        let c = result.counts.as_ref().unwrap();
        assert_eq!(
            c.read,
            c.kept + c.dropped.values().sum::<u64>(),
            "read = kept + dropped"
        );
    }

    /// A kept row, owned: user, time, order, item, quantity, monetary, weight,
    /// label.
    type Owned = (
        String,
        i64,
        Option<String>,
        Option<String>,
        f64,
        f64,
        f64,
        Option<String>,
    );

    /// Collects the kept rows of a split.
    #[derive(Default)]
    struct Collect(Vec<Owned>);

    impl RowSink for Collect {
        fn push(&mut self, r: &KeptRow<'_>) -> Result<(), WorkerError> {
            let own = |s: Option<&str>| s.map(str::to_string);
            self.0.push((
                r.user.to_string(),
                r.time_ms,
                own(r.order),
                own(r.item),
                r.quantity,
                r.monetary,
                r.weight,
                own(r.item_label),
            ));
            Ok(())
        }
    }

    fn sorted(mut rows: Vec<Row>) -> Vec<Row> {
        rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
        rows
    }

    /// user, time_ms, item, quantity, weight, item_label
    type Extra = (String, i64, Option<String>, f64, f64, Option<String>);

    /// (user key, item key, strength bits)
    type PairRow = (u64, u64, u64);

    struct Fixture {
        dir: tempfile::TempDir,
        staging: Location,
        /// Every row kept by the ingests into `staging`.
        kept: std::sync::Mutex<Vec<Owned>>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let staging = resolve(&dir.path().join("staging").display().to_string()).unwrap();
            Fixture {
                dir,
                staging,
                kept: Default::default(),
            }
        }

        /// Ingests `split` into this fixture's staging as a job does, and keeps
        /// its kept rows for the row-level checks.
        async fn ingest(
            &self,
            spec: &JobSpec,
            split: &pb::Split,
        ) -> Result<pb::SplitResult, WorkerError> {
            let result = ingest_split(spec, split, &self.staging).await?;
            let (again, rows) =
                clean_split(spec, split, &IngestControl::default(), Collect::default()).await?;
            assert_eq!(again.counts, result.counts, "the same rows kept");
            self.kept.lock().unwrap().extend(rows.0);
            Ok(result)
        }

        /// Every kept row (user, time, order, item, quantity, monetary), sorted;
        /// checks that the staged users are exactly the kept rows' users, each in
        /// its shard.
        async fn kept_rows(&self) -> Vec<Row> {
            let kept = self.kept.lock().unwrap().clone();
            let mut staged = BTreeSet::new();
            for shard in 0..SHARDS {
                for part in read_user_partials(&self.staging, shard).await.unwrap() {
                    for i in 0..part.len() {
                        assert_eq!(shard_of(part.ids.value(i), SHARDS), shard);
                        staged.insert(part.ids.value(i).to_string());
                    }
                }
            }
            let users: BTreeSet<String> = kept.iter().map(|r| r.0.clone()).collect();
            assert_eq!(staged, users, "staged users = the kept rows' users");
            sorted(
                kept.into_iter()
                    .map(|r| (r.0, r.1, r.2, r.3, r.4, r.5))
                    .collect(),
            )
        }

        /// The weight and label (with what identifies the row) of every kept row,
        /// in read order.
        fn kept_extras(&self) -> Vec<Extra> {
            self.kept
                .lock()
                .unwrap()
                .iter()
                .map(|r| (r.0.clone(), r.1, r.3.clone(), r.4, r.6, r.7.clone()))
                .collect()
        }

        /// The staged pairs of each item shard, checking each sits in its item's
        /// shard.
        async fn item_pairs(&self) -> Vec<Vec<PairRow>> {
            let mut out = Vec::new();
            for shard in 0..SHARDS {
                let mut rows = Vec::new();
                for part in read_item_partials(&self.staging, shard).await.unwrap() {
                    for j in 0..part.pair_items.len() {
                        let i = part.pair_items.value(j) as usize;
                        assert_eq!(shard_of(part.ids.value(i), SHARDS), shard);
                        rows.push((
                            part.pair_users.value(j),
                            part.keys.value(i),
                            part.pair_strength.value(j).to_bits(),
                        ));
                    }
                }
                out.push(rows);
            }
            out
        }

        /// The item shards' pairs are exactly the user shards' pairs, with the
        /// same strengths (bit for bit). Returns how many there are.
        async fn check_items_match_users(&self) -> usize {
            let mut from_users: Vec<PairRow> = Vec::new();
            for shard in 0..SHARDS {
                for part in read_user_partials(&self.staging, shard).await.unwrap() {
                    for j in 0..part.pair_users.len() {
                        from_users.push((
                            part.keys.value(part.pair_users.value(j) as usize),
                            part.pair_items.value(j),
                            part.pair_strength.value(j).to_bits(),
                        ));
                    }
                }
            }
            let mut from_items: Vec<PairRow> =
                self.item_pairs().await.into_iter().flatten().collect();
            from_users.sort();
            from_items.sort();
            assert_eq!(from_items, from_users);
            from_items.len()
        }

        async fn put(&self, name: &str, bytes: Vec<u8>) -> String {
            let loc =
                resolve(&self.dir.path().join("in").join(name).display().to_string()).unwrap();
            loc.put(Bytes::from(bytes)).await.unwrap();
            loc.url()
        }
    }

    fn split_of(object: &str, format: &str, gzip: bool) -> pb::Split {
        pb::Split {
            index: 3,
            object: object.to_string(),
            size: 0,
            format: format.to_string(),
            row_groups: Vec::new(),
            gzip,
        }
    }

    async fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = async_compression::tokio::write::GzipEncoder::new(Vec::new());
        enc.write_all(data).await.unwrap();
        enc.shutdown().await.unwrap();
        enc.into_inner()
    }

    fn retail_csv_dropped() -> BTreeMap<String, u64> {
        dropped(&[
            ("missing_user", 2),
            ("bad_user", 2),
            ("cancelled_order", 1),
            ("missing_time", 1),
            ("bad_time", 1),
            ("bad_quantity", 2),
            ("quantity_below_min", 1),
            ("bad_price", 2),
            ("price_at_or_below_min", 2),
        ])
    }

    async fn check_retail_csv(object: &str, gzip: bool, object_bytes: u64) {
        let fx = Fixture::new();
        let spec = retail_spec();
        let split = split_of(object, "csv", gzip);
        let result = fx.ingest(&spec, &split).await.unwrap();
        let counts = result.counts.clone().unwrap();
        assert_eq!(result.split, 3);
        assert_eq!(counts.read, 18);
        assert_eq!(counts.kept, 4);
        assert_eq!(dropped_of(&result), retail_csv_dropped());
        check_balance(&result);
        assert_eq!(result.min_time_ms, utc(2010, 12, 1, 8, 26, 0));
        assert_eq!(result.max_time_ms, utc(2011, 12, 9, 11, 50, 0));
        assert_eq!(result.bytes_read, object_bytes);
        assert_eq!(fx.kept_rows().await, sorted(retail_kept()));
        // No event column: every row weighs 1.0; labels are the Description.
        let mut labels: Vec<(String, i64, f64, Option<String>)> = fx
            .kept_extras()
            .into_iter()
            .map(|r| (r.0, r.1, r.4, r.5))
            .collect();
        labels.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let label = |s: &str| Some(s.to_string());
        assert_eq!(
            labels,
            vec![
                (
                    "12583".into(),
                    utc(2011, 12, 9, 11, 50, 0),
                    1.0,
                    label("JAR")
                ),
                (
                    "13047".into(),
                    utc(2010, 12, 1, 8, 34, 0),
                    1.0,
                    label("ASSORTED \"COLOUR\" BIRD")
                ),
                (
                    "17850".into(),
                    utc(2010, 12, 1, 8, 26, 0),
                    1.0,
                    label("WHITE HANGING HEART T-LIGHT HOLDER")
                ),
                (
                    "17850".into(),
                    utc(2010, 12, 1, 8, 28, 0),
                    1.0,
                    label("HAND WARMER, UNION JACK")
                ),
            ]
        );
        // The demo spec has features.als = true: the 3 kept rows with an item are
        // routed to item shards too.
        assert_eq!(fx.check_items_match_users().await, 3);
    }

    #[tokio::test]
    async fn csv_counts_every_drop_reason_and_stages_kept_rows() {
        let fx = Fixture::new();
        let url = fx.put("retail.csv", RETAIL_CSV.as_bytes().to_vec()).await;
        check_retail_csv(&url, false, RETAIL_CSV.len() as u64).await;
    }

    #[tokio::test]
    async fn gzip_csv_single_and_multi_member_read_the_same() {
        let fx = Fixture::new();
        let one = gzip(RETAIL_CSV.as_bytes()).await;
        let one_len = one.len() as u64;
        let url = fx.put("retail.csv.gz", one).await;
        check_retail_csv(&url, true, one_len).await;

        // Two gzip members, cut in the middle of a record.
        let cut = RETAIL_CSV.find("HAND WARMER").unwrap() + 4;
        let mut two = gzip(&RETAIL_CSV.as_bytes()[..cut]).await;
        two.extend(gzip(&RETAIL_CSV.as_bytes()[cut..]).await);
        let two_len = two.len() as u64;
        let url = fx.put("retail-2.csv.gz", two).await;
        check_retail_csv(&url, true, two_len).await;
    }

    #[tokio::test]
    async fn amount_column_is_the_monetary_value() {
        let fx = Fixture::new();
        let csv = "user,time,amount\r\na,2024-01-01,10.5\r\nb,2024-01-02,oops\r\nc,2024-01-03,\r\nd,2024-01-04,-2\r\n";
        let url = fx.put("a.csv", csv.as_bytes().to_vec()).await;
        let mut spec = retail_spec();
        spec.input.user_as_integer = false;
        spec.input.columns = Columns {
            user: "user".into(),
            time: "time".into(),
            amount: "amount".into(),
            ..Columns::default()
        };
        spec.input.clean = Default::default();
        spec.features.als = false;
        spec.validate().unwrap();
        let result = fx
            .ingest(&spec, &split_of(&url, "csv", false))
            .await
            .unwrap();
        assert_eq!(result.counts.as_ref().unwrap().kept, 2);
        assert_eq!(dropped_of(&result), dropped(&[("bad_amount", 2)]));
        check_balance(&result);
        let day = |d| utc(2024, 1, d, 0, 0, 0);
        assert_eq!(
            fx.kept_rows().await,
            vec![
                ("a".into(), day(1), None, None, 1.0, 10.5),
                ("d".into(), day(4), None, None, 1.0, -2.0),
            ]
        );
    }

    #[tokio::test]
    async fn missing_column_lists_the_columns_present() {
        let fx = Fixture::new();
        let url = fx.put("retail.csv", RETAIL_CSV.as_bytes().to_vec()).await;
        let mut spec = retail_spec();
        spec.input.columns.price = "Price".into();
        let err = fx
            .ingest(&spec, &split_of(&url, "csv", false))
            .await
            .unwrap_err();
        match &err {
            WorkerError::MissingColumn {
                file,
                field,
                column,
                present,
            } => {
                assert_eq!(file, &url);
                assert_eq!(*field, "price");
                assert_eq!(column, "Price");
                assert_eq!(present.len(), 8);
                assert!(present.contains(&"UnitPrice".to_string()));
            }
            other => panic!("expected MissingColumn, got {other}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("InvoiceNo, StockCode, Description") && text.contains(&url),
            "{text}"
        );
        assert!(fx.kept_rows().await.is_empty(), "nothing staged on error");
    }

    #[tokio::test]
    async fn column_names_match_ignoring_case_and_spaces() {
        let fx = Fixture::new();
        let csv = RETAIL_CSV.replacen("CustomerID", " customerid ", 1);
        let url = fx.put("retail.csv", csv.into_bytes()).await;
        let mut spec = retail_spec();
        spec.input.columns.quantity = "QUANTITY".into();
        let result = fx
            .ingest(&spec, &split_of(&url, "csv", false))
            .await
            .unwrap();
        assert_eq!(result.counts.unwrap().kept, 4);
    }

    #[tokio::test]
    async fn fail_on_bad_rows_names_file_row_and_value() {
        let fx = Fixture::new();
        let url = fx.put("retail.csv", RETAIL_CSV.as_bytes().to_vec()).await;
        let mut spec = retail_spec();
        spec.input.clean.on_bad_rows = OnBadRows::Fail;
        let err = fx
            .ingest(&spec, &split_of(&url, "csv", false))
            .await
            .unwrap_err();
        // Rows 4 and 5 have no user: a cleaning drop, not a bad row.
        match &err {
            WorkerError::BadRow {
                file,
                row,
                reason,
                detail,
            } => {
                assert_eq!(file, &url);
                assert_eq!(*row, 6);
                assert_eq!(*reason, "bad_user");
                assert!(
                    detail.contains("`12a`") && detail.contains("CustomerID"),
                    "{detail}"
                );
            }
            other => panic!("expected BadRow, got {other}"),
        }
        let text = err.to_string();
        assert!(text.contains(&url) && text.contains("row 6"), "{text}");

        // Without user_as_integer the first bad row is the missing time.
        spec.input.user_as_integer = false;
        let err = fx
            .ingest(&spec, &split_of(&url, "csv", false))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                WorkerError::BadRow {
                    row: 9,
                    reason: "missing_time",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn quoted_fields_keep_commas_quotes_and_line_breaks() {
        let fx = Fixture::new();
        let csv = "user,when,what,qty,price\r\n\
\"Smith, John\",2024-01-02,\"line one\r\nline two, still one field\",1,2.5\r\n\
\"O\"\"Brien\",2024-01-03T10:00:00.250Z,plain,2,1\r\n\
x,not-a-date,x,1,1";
        let url = fx.put("q.csv", csv.as_bytes().to_vec()).await;
        let mut spec = retail_spec();
        spec.input.user_as_integer = false;
        spec.input.columns = Columns {
            user: "user".into(),
            time: "when".into(),
            item: "what".into(),
            quantity: "qty".into(),
            price: "price".into(),
            ..Columns::default()
        };
        spec.input.clean = Default::default();
        spec.validate().unwrap();
        let result = fx
            .ingest(&spec, &split_of(&url, "csv", false))
            .await
            .unwrap();
        assert_eq!(dropped_of(&result), dropped(&[("bad_time", 1)]));
        assert_eq!(
            fx.kept_rows().await,
            sorted(vec![
                (
                    "Smith, John".into(),
                    utc(2024, 1, 2, 0, 0, 0),
                    None,
                    Some("line one\r\nline two, still one field".into()),
                    1.0,
                    2.5
                ),
                (
                    "O\"Brien".into(),
                    utc(2024, 1, 3, 10, 0, 0) + 250,
                    None,
                    Some("plain".into()),
                    2.0,
                    2.0
                ),
            ])
        );
        // The bad row is the third data row, though it starts on line 5.
        spec.input.clean.on_bad_rows = OnBadRows::Fail;
        let err = fx
            .ingest(&spec, &split_of(&url, "csv", false))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                WorkerError::BadRow {
                    row: 3,
                    reason: "bad_time",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("not-a-date"), "{err}");
    }

    #[tokio::test]
    async fn malformed_records_are_counted_bad_rows_in_file_order() {
        let fx = Fixture::new();
        let head =
            "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n";
        let good =
            |order: u32| format!("{order},85123A,HEART,6,2010-12-01 08:26:00,2.55,17850,UK\n");
        let mut csv = head.as_bytes().to_vec();
        csv.extend(good(1).bytes());
        csv.extend(b"2,85123A,short row\n"); // data row 2: 3 fields
        csv.extend(good(3).bytes());
        csv.extend(b"4,85123A,CAF\xe9,6,2010-12-01 08:26:00,2.55,17850,UK\n"); // row 4: not UTF-8
        csv.extend(good(5).bytes());
        csv.extend(b"6,85123A,CAFE,6,2010-12-01 08:26:00,2.55,17850,UK,extra\n"); // row 6: 9 fields
        csv.extend(good(7).bytes());
        csv.extend(b"8,85123A,\"unclosed,6,2010-12-01 08:26:00,2.55,17850,UK\n"); // row 8 swallows the rest
        csv.extend(good(9).bytes());
        let url = fx.put("bad.csv", csv).await;
        let spec = retail_spec();
        let result = fx
            .ingest(&spec, &split_of(&url, "csv", false))
            .await
            .unwrap();
        let counts = result.counts.clone().unwrap();
        assert_eq!((counts.read, counts.kept), (8, 4));
        assert_eq!(dropped_of(&result), dropped(&[("malformed_row", 4)]));

        // Under "fail" the first one stops the split, named by file and data row.
        let mut strict = retail_spec();
        strict.input.clean.on_bad_rows = OnBadRows::Fail;
        let split = split_of(&url, "csv", false);
        let err = fx.ingest(&strict, &split).await.unwrap_err();
        let WorkerError::BadRow {
            row: 2,
            reason: "malformed_row",
            detail,
            ..
        } = &err
        else {
            panic!("expected data row 2 malformed, got {err}");
        };
        assert!(
            detail.contains("3 fields where the header has 8"),
            "{detail}"
        );
        assert!(err.to_string().contains(&url), "{err}");
        // A byte that is not UTF-8 in a column the job reads is named too.
        let mut csv = head.as_bytes().to_vec();
        csv.extend(b"4,85123A,CAF\xe9,6,2010-12-01 08:26:00,2.55,17850,UK\n");
        let url = fx.put("latin1.csv", csv).await;
        let err = fx
            .ingest(&strict, &split_of(&url, "csv", false))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("row 1") && err.to_string().contains("field 3"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn header_only_and_bom_files() {
        let fx = Fixture::new();
        let header = RETAIL_CSV.lines().next().unwrap();
        let url = fx.put("empty.csv", header.as_bytes().to_vec()).await;
        let result = fx
            .ingest(&retail_spec(), &split_of(&url, "csv", false))
            .await
            .unwrap();
        assert_eq!(result.counts.as_ref().unwrap().read, 0);
        assert_eq!((result.min_time_ms, result.max_time_ms), (0, 0));

        let mut with_bom = b"\xEF\xBB\xBF".to_vec();
        with_bom.extend_from_slice(RETAIL_CSV.as_bytes());
        let url = fx.put("bom.csv", with_bom).await;
        let result = fx
            .ingest(&retail_spec(), &split_of(&url, "csv", false))
            .await
            .unwrap();
        assert_eq!(
            result.counts.unwrap().kept,
            4,
            "a BOM does not hide the first column"
        );
    }

    const EVENTS_CSV: &str = "\
user,when,sku,what,event,qty,price
u1,2024-01-01,A,Apple,view,1,2.0
u1,2024-01-02,B,Banana,purchase,2,1.5
u2,2024-01-03,A,,cart,3,2.0
u3,2024-01-04,,Nothing,purchase,1,1.0
u2,2024-01-05,C,Cherry,,1,1.0
u4,2024-01-06,D,  ,unknown,4,0.5
u5,2024-01-07,E,Egg, purchase ,2,1.0
u6,2024-01-08,F,Fig,Purchase,1,1.0
u7,bad-date,G,Grape,view,1,1.0
u8,2024-01-09,H,Honey,view,5,0.3
u9,2024-01-10,B,Banana,cart,7,0.25
";

    fn events_spec(object: &str, als: bool) -> JobSpec {
        JobSpec::parse(&format!(
            r#"name = "events"
[input]
interactions = "{object}"
[input.columns]
user = "user"
time = "when"
item = "sku"
item_label = "what"
event = "event"
quantity = "qty"
price = "price"
[input.events]
view = 0.1
cart = 0.5
purchase = 3.0
[output]
path = "out"
[features]
als = {als}
[evaluate]
holdout = 0.0
[cluster]
shards = {SHARDS}
"#
        ))
        .unwrap()
    }

    /// The kept rows of EVENTS_CSV with their weights and labels, in file order.
    fn events_kept() -> Vec<Extra> {
        let day = |d| utc(2024, 1, d, 0, 0, 0);
        let s = |x: &str| Some(x.to_string());
        vec![
            ("u1".into(), day(1), s("A"), 1.0, 0.1, s("Apple")),
            ("u1".into(), day(2), s("B"), 2.0, 3.0, s("Banana")),
            // empty label -> null
            ("u2".into(), day(3), s("A"), 3.0, 0.5, None),
            // no item: staged for the user, not routed to an item shard
            ("u3".into(), day(4), None, 1.0, 3.0, s("Nothing")),
            // empty event -> 1.0
            ("u2".into(), day(5), s("C"), 1.0, 1.0, s("Cherry")),
            // event not listed -> 1.0; blank label -> null
            ("u4".into(), day(6), s("D"), 4.0, 1.0, None),
            // the event is matched trimmed
            ("u5".into(), day(7), s("E"), 2.0, 3.0, s("Egg")),
            // ... in exact case
            ("u6".into(), day(8), s("F"), 1.0, 1.0, s("Fig")),
            ("u8".into(), day(9), s("H"), 5.0, 0.1, s("Honey")),
            ("u9".into(), day(10), s("B"), 7.0, 0.5, s("Banana")),
        ]
    }

    #[tokio::test]
    async fn events_weigh_rows_labels_are_kept_and_items_are_routed_by_item() {
        let fx = Fixture::new();
        let url = fx.put("events.csv", EVENTS_CSV.as_bytes().to_vec()).await;
        let spec = events_spec(&url, true);
        assert_eq!(spec.input.event_weight(Some(" purchase ")), 3.0);
        let result = fx
            .ingest(&spec, &split_of(&url, "csv", false))
            .await
            .unwrap();
        let counts = result.counts.clone().unwrap();
        assert_eq!((counts.read, counts.kept), (11, 10));
        assert_eq!(dropped_of(&result), dropped(&[("bad_time", 1)]));
        check_balance(&result);

        let kept = events_kept();
        let mut got = fx.kept_extras();
        got.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let mut want = kept.clone();
        want.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(got, want);

        // Each item shard holds exactly the pairs of the kept rows with an item
        // whose item hashes there, with strength = weight * quantity (the same f64
        // product; every pair here has one row).
        let shards = fx.item_pairs().await;
        let mut used = 0;
        for (shard, got) in shards.iter().enumerate() {
            let mut got = got.clone();
            got.sort();
            let mut want: Vec<PairRow> = kept
                .iter()
                .filter_map(|(user, _, item, qty, weight, _)| {
                    let item = item.as_deref()?;
                    (shard_of(item, SHARDS) == shard as u32).then(|| {
                        (
                            shoal_spec::hash::id_key(user),
                            shoal_spec::hash::id_key(item),
                            (weight * qty).to_bits(),
                        )
                    })
                })
                .collect();
            want.sort();
            assert_eq!(got, want, "item shard {shard}");
            used += usize::from(!got.is_empty());
        }
        assert!(used > 1, "the items spread over several shards");
        assert_eq!(fx.check_items_match_users().await, 9);
        let strengths: BTreeSet<u64> = shards.iter().flatten().map(|r| r.2).collect();
        assert!(strengths.contains(&(0.1f64 * 5.0).to_bits()));
        assert!(strengths.contains(&(0.5f64 * 7.0).to_bits()));

        // A blank event is not a bad row: under on_bad_rows = "fail" the first bad
        // row is still the unparseable time (row 9).
        let mut strict = spec.clone();
        strict.input.clean.on_bad_rows = OnBadRows::Fail;
        let err = Fixture::new()
            .ingest(&strict, &split_of(&url, "csv", false))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                WorkerError::BadRow {
                    row: 9,
                    reason: "bad_time",
                    ..
                }
            ),
            "{err}"
        );

        // Without ALS nothing is routed to item shards; weights and labels stay.
        let fx2 = Fixture::new();
        fx2.ingest(&events_spec(&url, false), &split_of(&url, "csv", false))
            .await
            .unwrap();
        assert!(fx2.item_pairs().await.iter().all(Vec::is_empty));
        let mut got = fx2.kept_extras();
        got.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(got, want);
        let items = fx2.staging.child("items");
        assert!(items.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn missing_event_or_label_column_lists_the_columns_present() {
        let fx = Fixture::new();
        let url = fx.put("retail.csv", RETAIL_CSV.as_bytes().to_vec()).await;
        for (field, column) in [("event", "EventType"), ("item_label", "Label")] {
            let mut spec = retail_spec();
            match field {
                "event" => {
                    spec.input.columns.event = column.into();
                    spec.input.events.insert("purchase".into(), 2.0);
                }
                _ => spec.input.columns.item_label = column.into(),
            }
            spec.validate().unwrap();
            let err = fx
                .ingest(&spec, &split_of(&url, "csv", false))
                .await
                .unwrap_err();
            match &err {
                WorkerError::MissingColumn {
                    file,
                    field: f,
                    column: c,
                    present,
                } => {
                    assert_eq!(file, &url);
                    assert_eq!(*f, field);
                    assert_eq!(c, column);
                    assert!(present.contains(&"Description".to_string()));
                }
                other => panic!("expected MissingColumn, got {other}"),
            }
            let text = err.to_string();
            assert!(
                text.contains(&format!("input.columns.{field}"))
                    && text.contains(column)
                    && text.contains("InvoiceNo, StockCode, Description"),
                "{text}"
            );
        }
        assert!(fx.kept_rows().await.is_empty());
        assert!(fx.item_pairs().await.iter().all(Vec::is_empty));
    }

    /// The Parquet twin of RETAIL_CSV, typed, in row groups of 4 rows.
    async fn retail_parquet(fx: &Fixture) -> String {
        #[allow(clippy::type_complexity)]
        let rows: Vec<(
            &str,
            Option<&str>,
            Option<i64>,
            Option<i64>,
            Option<f64>,
            Option<f64>,
        )> = vec![
            (
                "536365",
                Some("85123A"),
                Some(6),
                Some(utc(2010, 12, 1, 8, 26, 0)),
                Some(2.55),
                Some(17850.0),
            ),
            (
                "536366",
                Some("22633"),
                Some(6),
                Some(utc(2010, 12, 1, 8, 28, 0)),
                Some(1.85),
                Some(17850.0),
            ),
            (
                "536368",
                Some("22960"),
                Some(3),
                Some(utc(2010, 12, 1, 0, 0, 0)),
                Some(4.25),
                None,
            ),
            (
                "536371",
                Some("22963"),
                Some(3),
                Some(utc(2010, 12, 1, 0, 0, 0)),
                Some(4.25),
                Some(12.5),
            ),
            (
                "C536372",
                Some("22964"),
                Some(-1),
                Some(utc(2010, 12, 1, 9, 0, 0)),
                Some(4.25),
                Some(12583.0),
            ),
            (
                "536373",
                Some("22965"),
                Some(3),
                None,
                Some(4.25),
                Some(12583.0),
            ),
            (
                "536376",
                Some("22968"),
                None,
                Some(utc(2010, 12, 2, 10, 0, 0)),
                Some(4.25),
                Some(12583.0),
            ),
            (
                "536377",
                Some("22969"),
                Some(0),
                Some(utc(2010, 12, 2, 10, 0, 0)),
                Some(4.25),
                Some(12583.0),
            ),
            (
                "536378",
                Some("22970"),
                Some(2),
                Some(utc(2010, 12, 2, 10, 0, 0)),
                None,
                Some(12583.0),
            ),
            (
                "536379",
                Some("22971"),
                Some(2),
                Some(utc(2010, 12, 2, 10, 0, 0)),
                Some(f64::NAN),
                Some(12583.0),
            ),
            (
                "536380",
                Some("22972"),
                Some(2),
                Some(utc(2010, 12, 2, 10, 0, 0)),
                Some(0.0),
                Some(12583.0),
            ),
            (
                "536367",
                Some("84879"),
                Some(32),
                Some(utc(2010, 12, 1, 8, 34, 0)),
                Some(1.69),
                Some(13047.0),
            ),
            (
                "536381",
                Some("22973"),
                Some(2),
                Some(utc(2010, 12, 2, 10, 0, 0)),
                Some(f64::INFINITY),
                Some(12583.0),
            ),
            (
                "536382",
                None,
                Some(2),
                Some(utc(2011, 12, 9, 11, 50, 0)),
                Some(3.5),
                Some(12583.0),
            ),
        ];
        let mut qty = Int64Builder::new();
        let mut price = Float64Builder::new();
        let mut user = Float64Builder::new();
        for r in &rows {
            qty.append_option(r.2);
            price.append_option(r.4);
            user.append_option(r.5);
        }
        let time: TimestampMicrosecondArray =
            rows.iter().map(|r| r.3.map(|ms| ms * 1000)).collect();
        let batch = RecordBatch::try_from_iter([
            (
                "InvoiceNo",
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))) as ArrayRef,
            ),
            (
                "StockCode",
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1))) as ArrayRef,
            ),
            ("Quantity", Arc::new(qty.finish()) as ArrayRef),
            (
                "InvoiceDate",
                Arc::new(time.with_timezone("UTC")) as ArrayRef,
            ),
            ("UnitPrice", Arc::new(price.finish()) as ArrayRef),
            ("CustomerID", Arc::new(user.finish()) as ArrayRef),
            (
                "Description",
                Arc::new(StringArray::from_iter(
                    rows.iter()
                        .map(|r| r.1.map(|item| format!("label of {item}"))),
                )) as ArrayRef,
            ),
        ])
        .unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(4))
            .build();
        let mut writer = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        let bytes = writer.into_inner().unwrap();
        fx.put("retail.parquet", bytes).await
    }

    #[tokio::test]
    async fn parquet_with_typed_columns_stages_the_same_rows_as_csv() {
        let fx = Fixture::new();
        let url = retail_parquet(&fx).await;
        let split = split_of(&url, "parquet", false);
        let result = fx.ingest(&retail_spec(), &split).await.unwrap();
        let counts = result.counts.clone().unwrap();
        assert_eq!((counts.read, counts.kept), (14, 4));
        assert_eq!(
            dropped_of(&result),
            dropped(&[
                ("missing_user", 1),
                ("bad_user", 1),
                ("cancelled_order", 1),
                ("missing_time", 1),
                ("bad_quantity", 1),
                ("quantity_below_min", 1),
                ("bad_price", 3),
                ("price_at_or_below_min", 1),
            ])
        );
        check_balance(&result);
        assert_eq!(result.min_time_ms, utc(2010, 12, 1, 8, 26, 0));
        assert_eq!(result.max_time_ms, utc(2011, 12, 9, 11, 50, 0));
        assert!(result.bytes_read > 0);
        assert_eq!(fx.kept_rows().await, sorted(retail_kept()));
        let mut labels: Vec<(String, Option<String>)> =
            fx.kept_extras().into_iter().map(|r| (r.0, r.5)).collect();
        labels.sort();
        let label = |s: &str| Some(s.to_string());
        assert_eq!(
            labels,
            vec![
                ("12583".into(), None),
                ("13047".into(), label("label of 84879")),
                ("17850".into(), label("label of 22633")),
                ("17850".into(), label("label of 85123A")),
            ]
        );
        assert_eq!(fx.check_items_match_users().await, 3);

        // Without user_as_integer, float ids print as Rust prints them.
        let fx2 = Fixture::new();
        let mut spec = retail_spec();
        spec.input.user_as_integer = false;
        fx2.ingest(&spec, &split).await.unwrap();
        let users: BTreeSet<String> = fx2.kept_rows().await.into_iter().map(|r| r.0).collect();
        assert!(
            users.contains("12.5") && users.contains("17850"),
            "{users:?}"
        );
    }

    #[tokio::test]
    async fn parquet_row_groups_select_rows_and_number_bad_rows_in_the_file() {
        let fx = Fixture::new();
        let url = retail_parquet(&fx).await;
        let mut split = split_of(&url, "parquet", false);
        let whole = Fixture::new().ingest(&retail_spec(), &split).await.unwrap();
        split.row_groups = vec![1];
        let result = fx.ingest(&retail_spec(), &split).await.unwrap();
        assert_eq!(result.counts.as_ref().unwrap().read, 4);
        assert!(
            result.bytes_read < whole.bytes_read,
            "one row group fetches less than the whole file: {} vs {}",
            result.bytes_read,
            whole.bytes_read
        );
        assert_eq!(
            dropped_of(&result),
            dropped(&[
                ("cancelled_order", 1),
                ("missing_time", 1),
                ("bad_quantity", 1),
                ("quantity_below_min", 1),
            ])
        );
        assert!(fx.kept_rows().await.is_empty());

        split.row_groups = vec![3, 0];
        let result = fx.ingest(&retail_spec(), &split).await.unwrap();
        assert_eq!(result.counts.as_ref().unwrap().read, 6);
        assert_eq!(result.counts.as_ref().unwrap().kept, 3);

        let mut spec = retail_spec();
        spec.input.clean.on_bad_rows = OnBadRows::Fail;
        split.row_groups = vec![2];
        let err = fx.ingest(&spec, &split).await.unwrap_err();
        assert!(
            matches!(
                &err,
                WorkerError::BadRow {
                    row: 9,
                    reason: "bad_price",
                    ..
                }
            ),
            "{err}"
        );

        // Row groups are read in the order given; rows are numbered in the file.
        split.row_groups = vec![3, 2];
        let err = fx.ingest(&spec, &split).await.unwrap_err();
        assert!(
            matches!(
                &err,
                WorkerError::BadRow {
                    row: 13,
                    reason: "bad_price",
                    ..
                }
            ),
            "{err}"
        );

        split.row_groups = vec![9];
        let err = fx.ingest(&retail_spec(), &split).await.unwrap_err();
        assert!(matches!(err, WorkerError::InvalidRequest(_)), "{err}");
    }

    #[tokio::test]
    async fn parquet_column_of_an_unusable_type_is_named() {
        let fx = Fixture::new();
        let batch = RecordBatch::try_from_iter([
            (
                "CustomerID",
                Arc::new(StringArray::from(vec!["1"])) as ArrayRef,
            ),
            (
                "InvoiceDate",
                Arc::new(Float64Array::from(vec![1.0])) as ArrayRef,
            ),
            (
                "UnitPrice",
                Arc::new(Float64Array::from(vec![1.0])) as ArrayRef,
            ),
        ])
        .unwrap();
        let mut writer = ArrowWriter::try_new(Vec::new(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        let url = fx.put("t.parquet", writer.into_inner().unwrap()).await;
        let mut spec = retail_spec();
        spec.input.columns = Columns {
            user: "CustomerID".into(),
            time: "InvoiceDate".into(),
            price: "UnitPrice".into(),
            ..Columns::default()
        };
        spec.input.clean = Default::default();
        let err = fx
            .ingest(&spec, &split_of(&url, "parquet", false))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, WorkerError::ColumnType { field: "time", column, .. } if column == "InvoiceDate"),
            "{err}"
        );
    }

    #[test]
    fn bad_reasons_are_the_unparseable_ones() {
        let bad: Vec<&str> = DropReason::ALL
            .iter()
            .filter(|r| r.is_bad())
            .map(|r| r.as_str())
            .collect();
        assert_eq!(
            bad,
            [
                "malformed_row",
                "bad_user",
                "missing_time",
                "bad_time",
                "bad_quantity",
                "bad_price",
                "bad_amount"
            ]
        );
    }

    /// The bundled Online Retail log with the demo cleaning reproduces the published
    /// figures (data/online-retail/README.md, from UCI).
    #[tokio::test]
    async fn online_retail_with_demo_cleaning_matches_published_figures() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/online-retail/online_retail.csv.gz")
            .canonicalize()
            .expect("the Online Retail log is bundled under data/online-retail");
        let path = path.to_str().unwrap();
        let loc = resolve(path).unwrap();
        let size = loc
            .head()
            .await
            .unwrap()
            .expect("the bundled Online Retail file")
            .size;
        let fx = Fixture::new();
        let mut spec = JobSpec::parse(DEMO_SPEC).unwrap();
        spec.input.interactions = path.to_string();
        let (format, gzip) = Format::from_name(path).unwrap();
        let split = pb::Split {
            index: 0,
            object: loc.url(),
            size,
            format: format.as_str().to_string(),
            row_groups: Vec::new(),
            gzip,
        };
        let started = std::time::Instant::now();
        let result = fx.ingest(&spec, &split).await.unwrap();
        let elapsed = started.elapsed();
        let counts = result.counts.clone().unwrap();
        assert_eq!(counts.read, 541_909);
        assert_eq!(counts.kept, 397_884);
        check_balance(&result);
        assert_eq!(result.bytes_read, size);
        assert_eq!(result.min_time_ms, utc(2010, 12, 1, 8, 26, 0));
        assert_eq!(result.max_time_ms, utc(2011, 12, 9, 12, 50, 0));
        assert_eq!(
            counts.dropped.get("bad_time"),
            None,
            "every InvoiceDate parses"
        );

        let mut users = BTreeSet::new();
        let mut rows = 0;
        for shard in 0..spec.cluster.shards {
            for part in read_user_partials(&fx.staging, shard).await.unwrap() {
                rows += part.events.values().iter().sum::<u64>();
                users.extend(part.ids.iter().flatten().map(str::to_string));
            }
        }
        assert_eq!(rows, 397_884, "every kept row is an event of its user");
        assert_eq!(users.len(), 4_338);
        eprintln!("online retail: ingest took {elapsed:?}");
    }
}
