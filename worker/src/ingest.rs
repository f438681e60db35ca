//! Ingest: read one input split, clean its rows, route them to user shards (and,
//! with `features.als = true`, the rows with an item to item shards too).
//!
//! A split is a whole CSV object (optionally gzip) or some row groups of a Parquet
//! object, always read through `object_store`. Every data row is counted: it is
//! either kept (and staged, see [`crate::staging`]) or dropped under exactly one
//! reason ([`DropReason`]), checked in a fixed order. Bad rows (unparseable values, missing
//! times) fail the split when `input.clean.on_bad_rows = "fail"`; cleaning drops
//! (missing users, cancellations, values below the minimums) never do.
//!
//! Each kept row carries its event weight (`[input.events]` by the value of
//! `input.columns.event`; 1.0 without an event column or for a blank value, which is
//! never a bad row) and its item label (`input.columns.item_label`, null when blank).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, LargeStringArray, StringArray,
    StringBuilder, StringViewArray, new_empty_array, new_null_array,
};
use arrow::compute::cast;
use arrow::csv::reader::Decoder;
use arrow::datatypes::{
    DataType, Date32Type, Field, Float32Type, Float64Type, Int64Type, Schema, TimeUnit,
    TimestampMillisecondType,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use async_compression::tokio::bufread::GzipDecoder;
use chrono::format::{Item, Parsed, StrftimeItems};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use parquet::errors::ParquetError;
use shoal_proto::pb;
use shoal_proto::spec::{Columns, Format, InputSpec, JobSpec, OnBadRows};
use shoal_proto::store::{ParquetSource, resolve};
use shoal_proto::{Location, SpecError, StoreError};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio_util::io::StreamReader;
use tokio_util::sync::CancellationToken;

use crate::error::WorkerError;
use crate::staging::{SplitWriter, StagedRow};

/// Rows per decoded batch.
const BATCH_ROWS: usize = 8192;
/// Buffer between the gzip decoder and the CSV decoder.
const GUNZIP_BUFFER: usize = 256 * 1024;

/// Why a row was dropped. The checks run in this order and a row is counted under
/// the first reason that applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
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
    pub const ALL: [DropReason; 10] = [
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

/// Reads split `split`, cleans its rows, routes the kept ones to user shards (and
/// with `features.als` those with an item to item shards) and writes them below
/// `staging` (one file per non-empty shard, overwriting an earlier attempt of the
/// same split).
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
    control.check()?;
    let loc = resolve(&split.object)?;
    let mut sink = (Cleaner::new(spec, split, control)?, None);
    let bytes_read = read_split(split, &loc, &mut sink).await?;
    let (cleaner, _) = sink;
    let Cleaner {
        counts,
        read,
        kept,
        min_time_ms,
        max_time_ms,
        writer,
        ..
    } = cleaner;
    control.check()?;
    let files = writer.write(staging).await?;
    let row_counts = row_counts(
        read,
        kept,
        DropReason::ALL.map(|r| (r.as_str(), counts[r as usize])),
    );
    tracing::debug!(
        split = split.index,
        object = %split.object,
        read,
        kept,
        files = files.users.len(),
        item_files = files.items.len(),
        bytes_read,
        "ingested split"
    );
    Ok(pb::SplitResult {
        split: split.index,
        counts: Some(row_counts),
        min_time_ms: if kept > 0 { min_time_ms } else { 0 },
        max_time_ms: if kept > 0 { max_time_ms } else { 0 },
        bytes_read,
    })
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
        Format::Csv => read_csv(split, loc, sink).await,
        Format::Parquet => {
            if split.gzip {
                return Err(WorkerError::InvalidRequest(format!(
                    "split {} of {}: gzip-compressed Parquet is not supported (Parquet compresses its pages itself)",
                    split.index, split.object
                )));
            }
            read_parquet(split, loc, sink).await
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
// Columns

/// What a column of the input is used for; `field` is its key in `input.columns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    User,
    Time,
    Order,
    Item,
    Quantity,
    Price,
    Amount,
    Event,
    ItemLabel,
}

/// How many roles there are.
const ROLES: usize = Role::ALL.len();

impl Role {
    const ALL: [Role; 9] = [
        Role::User,
        Role::Time,
        Role::Order,
        Role::Item,
        Role::Quantity,
        Role::Price,
        Role::Amount,
        Role::Event,
        Role::ItemLabel,
    ];

    fn field(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Time => "time",
            Role::Order => "order",
            Role::Item => "item",
            Role::Quantity => "quantity",
            Role::Price => "price",
            Role::Amount => "amount",
            Role::Event => "event",
            Role::ItemLabel => "item_label",
        }
    }

    fn column(self, cols: &Columns) -> Option<&str> {
        match self {
            Role::User => Some(cols.user()).filter(|c| !c.is_empty()),
            Role::Time => cols.time(),
            Role::Order => cols.order(),
            Role::Item => cols.item(),
            Role::Quantity => cols.quantity(),
            Role::Price => cols.price(),
            Role::Amount => cols.amount(),
            Role::Event => cols.event(),
            Role::ItemLabel => cols.item_label(),
        }
    }
}

/// Where each role's column is: its index in the input schema and its position in
/// the projected batches (the projection is the sorted, distinct input indices).
#[derive(Debug, Clone)]
struct Plan {
    projection: Vec<usize>,
    slots: [Option<Slot>; ROLES],
}

#[derive(Debug, Clone)]
struct Slot {
    /// Position in the projected batch.
    pos: usize,
    /// The column's name in the input.
    column: String,
}

/// The input column named `want`: an exact match, else the first match ignoring
/// case and surrounding spaces.
pub(crate) fn find_column(schema: &Schema, want: &str) -> Option<usize> {
    let fields = schema.fields();
    fields.iter().position(|f| f.name() == want).or_else(|| {
        let want = want.trim();
        fields
            .iter()
            .position(|f| f.name().trim().eq_ignore_ascii_case(want))
    })
}

impl Plan {
    fn new(spec: &JobSpec, schema: &Schema, file: &str) -> Result<Plan, WorkerError> {
        let cols = &spec.input.columns;
        let mut found: [Option<usize>; ROLES] = [None; ROLES];
        for role in Role::ALL {
            let Some(want) = role.column(cols) else {
                continue;
            };
            match find_column(schema, want) {
                Some(index) => found[role as usize] = Some(index),
                None => {
                    return Err(WorkerError::MissingColumn {
                        file: file.to_string(),
                        field: role.field(),
                        column: want.to_string(),
                        present: schema.fields().iter().map(|f| f.name().clone()).collect(),
                    });
                }
            }
        }
        let mut projection: Vec<usize> = found.iter().flatten().copied().collect();
        projection.sort_unstable();
        projection.dedup();
        let slots = found.map(|index| {
            index.map(|index| Slot {
                pos: projection.binary_search(&index).expect("projected"),
                column: schema.field(index).name().clone(),
            })
        });
        Ok(Plan { projection, slots })
    }

    fn slot(&self, role: Role) -> Option<&Slot> {
        self.slots[role as usize].as_ref()
    }
}

/// A text column of any of Arrow's string layouts.
pub(crate) enum Text {
    Utf8(StringArray),
    Large(LargeStringArray),
    View(StringViewArray),
}

impl Text {
    fn from_string_array(array: &ArrayRef) -> Option<Text> {
        match array.data_type() {
            DataType::Utf8 => Some(Text::Utf8(array.as_string::<i32>().clone())),
            DataType::LargeUtf8 => Some(Text::Large(array.as_string::<i64>().clone())),
            DataType::Utf8View => Some(Text::View(array.as_string_view().clone())),
            _ => None,
        }
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<&str> {
        match self {
            Text::Utf8(a) => (!a.is_null(i)).then(|| a.value(i)),
            Text::Large(a) => (!a.is_null(i)).then(|| a.value(i)),
            Text::View(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

/// A number column: numeric input cast to f64, or text parsed row by row.
pub(crate) enum Numbers {
    F64(Float64Array),
    Text(Text),
}

/// One value of a number column.
pub(crate) enum Num {
    Missing,
    Bad,
    Value(f64),
}

impl Numbers {
    #[inline]
    pub(crate) fn get(&self, i: usize) -> Num {
        match self {
            Numbers::F64(a) => {
                if a.is_null(i) {
                    Num::Missing
                } else {
                    let v = a.value(i);
                    if v.is_finite() {
                        Num::Value(v)
                    } else {
                        Num::Bad
                    }
                }
            }
            Numbers::Text(t) => match t.get(i).map(str::trim) {
                None | Some("") => Num::Missing,
                Some(s) => match s.parse::<f64>() {
                    Ok(v) if v.is_finite() => Num::Value(v),
                    _ => Num::Bad,
                },
            },
        }
    }

    /// The value as read, for error messages.
    pub(crate) fn describe(&self, i: usize) -> String {
        match self {
            Numbers::F64(a) if a.is_null(i) => "null".to_string(),
            Numbers::F64(a) => format!("`{}`", a.value(i)),
            Numbers::Text(t) => describe_text(t.get(i)),
        }
    }
}

pub(crate) fn describe_text(value: Option<&str>) -> String {
    match value {
        None => "empty".to_string(),
        Some(s) if s.trim().is_empty() => format!("blank (`{s}`)"),
        Some(s) => format!("`{s}`"),
    }
}

/// A time column: typed times as ms since the epoch, or text parsed row by row.
enum Times {
    Ms(Int64Array),
    Text(Text),
}

/// The role columns of one batch, converted for the row loop.
struct Prepared {
    user: Text,
    time: Times,
    order: Option<Text>,
    item: Option<Text>,
    quantity: Option<Numbers>,
    price: Option<Numbers>,
    amount: Option<Numbers>,
    event: Option<Text>,
    item_label: Option<Text>,
}

/// Unwraps dictionary encoding: the values' type is what counts.
pub(crate) fn decoded(array: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    match array.data_type() {
        DataType::Dictionary(_, values) => cast(array, values),
        _ => Ok(array.clone()),
    }
}

pub(crate) fn user_text(array: &ArrayRef) -> Result<Option<Text>, ArrowError> {
    let array = decoded(array)?;
    let dt = array.data_type();
    if let Some(t) = Text::from_string_array(&array) {
        return Ok(Some(t));
    }
    let text: ArrayRef = match dt {
        DataType::Null => new_null_array(&DataType::Utf8, array.len()),
        d if d.is_integer() => cast(&array, &DataType::Utf8)?,
        // Floats as Rust prints them (`17850.0` -> `17850`), in their own width.
        DataType::Float16 | DataType::Float32 => {
            let f32s = cast(&array, &DataType::Float32)?;
            let f32s = f32s.as_primitive::<Float32Type>();
            Arc::new(format_floats(f32s.iter()))
        }
        DataType::Float64 => Arc::new(format_floats(array.as_primitive::<Float64Type>().iter())),
        _ => return Ok(None),
    };
    Ok(Text::from_string_array(&text))
}

fn format_floats<T: std::fmt::Display>(values: impl Iterator<Item = Option<T>>) -> StringArray {
    use std::fmt::Write;
    let mut b = StringBuilder::new();
    for v in values {
        match v {
            Some(v) => {
                write!(b, "{v}").expect("writing to a builder cannot fail");
                b.append_value("");
            }
            None => b.append_null(),
        }
    }
    b.finish()
}

fn id_text(array: &ArrayRef) -> Result<Option<Text>, ArrowError> {
    let array = decoded(array)?;
    if let Some(t) = Text::from_string_array(&array) {
        return Ok(Some(t));
    }
    let dt = array.data_type();
    if dt.is_integer() || *dt == DataType::Null {
        return Ok(Text::from_string_array(&cast(&array, &DataType::Utf8)?));
    }
    Ok(None)
}

pub(crate) fn numbers(array: &ArrayRef) -> Result<Option<Numbers>, ArrowError> {
    let array = decoded(array)?;
    if let Some(t) = Text::from_string_array(&array) {
        return Ok(Some(Numbers::Text(t)));
    }
    let dt = array.data_type();
    if dt.is_numeric() || *dt == DataType::Null {
        let f = cast(&array, &DataType::Float64)?;
        return Ok(Some(Numbers::F64(f.as_primitive::<Float64Type>().clone())));
    }
    Ok(None)
}

const MS_PER_DAY: i64 = 86_400_000;

fn times(array: &ArrayRef) -> Result<Option<Times>, ArrowError> {
    let array = decoded(array)?;
    if let Some(t) = Text::from_string_array(&array) {
        return Ok(Some(Times::Text(t)));
    }
    let ms = match array.data_type() {
        // Timestamps are UTC instants whatever their zone: keep the zone, change
        // the unit, and the values are ms since the epoch.
        DataType::Timestamp(_, tz) => {
            let ms = cast(
                &array,
                &DataType::Timestamp(TimeUnit::Millisecond, tz.clone()),
            )?;
            let ms = ms.as_primitive::<TimestampMillisecondType>();
            Int64Array::new(ms.values().clone(), ms.nulls().cloned())
        }
        DataType::Date32 => array
            .as_primitive::<Date32Type>()
            .unary::<_, Int64Type>(|days| i64::from(days) * MS_PER_DAY),
        DataType::Date64 => {
            let ms = cast(&array, &DataType::Int64)?;
            ms.as_primitive::<Int64Type>().clone()
        }
        DataType::Null => Int64Array::new_null(array.len()),
        _ => return Ok(None),
    };
    Ok(Some(Times::Ms(ms)))
}

impl Prepared {
    /// Converts the role columns of a projected batch.
    fn new(plan: &Plan, columns: &[ArrayRef], file: &str) -> Result<Prepared, WorkerError> {
        fn get<T>(
            plan: &Plan,
            columns: &[ArrayRef],
            file: &str,
            role: Role,
            convert: fn(&ArrayRef) -> Result<Option<T>, ArrowError>,
        ) -> Result<Option<T>, WorkerError> {
            let Some(slot) = plan.slot(role) else {
                return Ok(None);
            };
            let array = &columns[slot.pos];
            let type_error = || WorkerError::ColumnType {
                file: file.to_string(),
                field: role.field(),
                column: slot.column.clone(),
                data_type: array.data_type().to_string(),
            };
            match convert(array) {
                Ok(Some(v)) => Ok(Some(v)),
                Ok(None) => Err(type_error()),
                Err(source) => Err(WorkerError::Arrow {
                    file: file.to_string(),
                    source,
                }),
            }
        }
        let required = |role: Role| {
            WorkerError::Spec(SpecError::Invalid {
                field: if role == Role::User {
                    "input.columns.user"
                } else {
                    "input.columns.time"
                },
                message: "is required".to_string(),
            })
        };
        Ok(Prepared {
            user: get(plan, columns, file, Role::User, user_text)?
                .ok_or_else(|| required(Role::User))?,
            time: get(plan, columns, file, Role::Time, times)?
                .ok_or_else(|| required(Role::Time))?,
            order: get(plan, columns, file, Role::Order, id_text)?,
            item: get(plan, columns, file, Role::Item, id_text)?,
            quantity: get(plan, columns, file, Role::Quantity, numbers)?,
            price: get(plan, columns, file, Role::Price, numbers)?,
            amount: get(plan, columns, file, Role::Amount, numbers)?,
            event: get(plan, columns, file, Role::Event, id_text)?,
            item_label: get(plan, columns, file, Role::ItemLabel, id_text)?,
        })
    }

    /// Checks, before reading any row, that every role column has a usable type.
    fn check_types(plan: &Plan, schema: &Schema, file: &str) -> Result<(), WorkerError> {
        let empty: Vec<ArrayRef> = plan
            .projection
            .iter()
            .map(|&i| new_empty_array(schema.field(i).data_type()))
            .collect();
        Prepared::new(plan, &empty, file).map(|_| ())
    }
}

// ---------------------------------------------------------------------------
// Time parsing

/// Parses the time column's text: ISO-8601 / RFC 3339 by default, or a strftime
/// format (`input.time_format`). Naive times are UTC; a date alone is midnight UTC.
pub struct TimeParser {
    format: Option<(String, Vec<Item<'static>>)>,
}

impl TimeParser {
    pub fn new(time_format: Option<&str>) -> Result<TimeParser, SpecError> {
        let format = match time_format {
            None => None,
            Some(f) => {
                let items =
                    StrftimeItems::new(f)
                        .parse_to_owned()
                        .map_err(|e| SpecError::Invalid {
                            field: "input.time_format",
                            message: format!("`{f}` is not a valid strftime format: {e}"),
                        })?;
                Some((f.to_string(), items))
            }
        };
        Ok(TimeParser { format })
    }

    /// Milliseconds since the Unix epoch, or `None` when `s` is not a time.
    pub fn parse(&self, s: &str) -> Option<i64> {
        match &self.format {
            None => parse_iso_ms(s),
            Some((_, items)) => parse_with_items(items, s.trim()),
        }
    }

    fn expected(&self) -> String {
        match &self.format {
            None => "YYYY-MM-DD, YYYY-MM-DD HH:MM[:SS[.fff]] or RFC 3339".to_string(),
            Some((f, _)) => format!("input.time_format `{f}`"),
        }
    }
}

fn parse_with_items(items: &[Item<'static>], s: &str) -> Option<i64> {
    let mut parsed = Parsed::new();
    chrono::format::parse(&mut parsed, s, items.iter()).ok()?;
    if parsed.offset().is_some() {
        return parsed.to_datetime().ok().map(|t| t.timestamp_millis());
    }
    match parsed.to_naive_datetime_with_offset(0) {
        Ok(t) => Some(t.and_utc().timestamp_millis()),
        // A format without a time of day: the date at midnight.
        Err(_) => parsed.to_naive_date().ok().map(|d| {
            d.and_time(chrono::NaiveTime::MIN)
                .and_utc()
                .timestamp_millis()
        }),
    }
}

#[inline]
fn digits2(b: &[u8], at: usize) -> Option<u32> {
    match b.get(at..at + 2)? {
        [x @ b'0'..=b'9', y @ b'0'..=b'9'] => Some(u32::from(x - b'0') * 10 + u32::from(y - b'0')),
        _ => None,
    }
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(year) => 29,
        _ => 28,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The default time format, without allocation: `YYYY-MM-DD`, then optionally
/// ` ` or `T` and `HH:MM[:SS[.fraction]]`, then optionally `Z` or `±HH:MM`
/// (`±HHMM`, `±HH` too). Surrounding spaces are ignored.
pub fn parse_iso_ms(s: &str) -> Option<i64> {
    let b = s.trim().as_bytes();
    let year = {
        let y = b.get(0..4)?;
        if !y.iter().all(u8::is_ascii_digit) {
            return None;
        }
        y.iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'))
    };
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let month = digits2(b, 5)?;
    let day = digits2(b, 8)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let mut ms = days_from_civil(year, month, day) * MS_PER_DAY;
    let mut i = 10;
    if i == b.len() {
        return Some(ms);
    }
    if !matches!(b[i], b' ' | b'T' | b't') {
        return None;
    }
    let hour = digits2(b, i + 1)?;
    if b.get(i + 3) != Some(&b':') {
        return None;
    }
    let minute = digits2(b, i + 4)?;
    i += 6;
    let mut second = 0;
    let mut millis = 0;
    if b.get(i) == Some(&b':') {
        second = digits2(b, i + 1)?;
        i += 3;
        if matches!(b.get(i), Some(b'.' | b',')) {
            i += 1;
            let start = i;
            let mut scale = 100;
            while let Some(d @ b'0'..=b'9') = b.get(i) {
                millis += u32::from(d - b'0') * scale;
                scale /= 10;
                i += 1;
            }
            if i == start {
                return None;
            }
        }
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    ms += i64::from(hour) * 3_600_000
        + i64::from(minute) * 60_000
        + i64::from(second) * 1000
        + i64::from(millis);
    match b.get(i) {
        None => {}
        Some(b'Z' | b'z') => i += 1,
        Some(&sign @ (b'+' | b'-')) => {
            let oh = digits2(b, i + 1)?;
            i += 3;
            let om = match b.get(i) {
                None => 0,
                Some(b':') => {
                    let m = digits2(b, i + 1)?;
                    i += 3;
                    m
                }
                Some(_) => {
                    let m = digits2(b, i)?;
                    i += 2;
                    m
                }
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let offset = i64::from(oh) * 3_600_000 + i64::from(om) * 60_000;
            ms -= if sign == b'+' { offset } else { -offset };
        }
        Some(_) => return None,
    }
    (i == b.len()).then_some(ms)
}

/// Writes the integer `s` stands for into `out` (`17850.0` -> `17850`, `-007` ->
/// `-7`); false when `s` is not an integer (`17850.5`, `1e3`, `12a`).
pub fn canonical_integer(s: &str, out: &mut String) -> bool {
    let s = s.trim();
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b == b'0')
    {
        return false;
    }
    let int = int.trim_start_matches('0');
    out.clear();
    if int.is_empty() {
        out.push('0');
    } else {
        if negative {
            out.push('-');
        }
        out.push_str(int);
    }
    true
}

// ---------------------------------------------------------------------------
// Cleaning

/// Cleans batches of one split and buffers the kept rows per shard.
struct Cleaner<'a> {
    spec: &'a JobSpec,
    file: &'a str,
    /// For the event weights.
    input: &'a InputSpec,
    fail_on_bad: bool,
    user_as_integer: bool,
    drop_order_prefixes: &'a [String],
    min_quantity: Option<f64>,
    min_price: Option<f64>,
    time: TimeParser,
    counts: [u64; DropReason::ALL.len()],
    read: u64,
    kept: u64,
    min_time_ms: i64,
    max_time_ms: i64,
    writer: SplitWriter,
    user_buf: String,
    control: &'a IngestControl,
}

impl<'a> Cleaner<'a> {
    fn new(
        spec: &'a JobSpec,
        split: &'a pb::Split,
        control: &'a IngestControl,
    ) -> Result<Cleaner<'a>, WorkerError> {
        let input = &spec.input;
        if input.columns.time().is_none() {
            return Err(SpecError::Invalid {
                field: "input.columns.time",
                message: "is required: every staged row has an event time".to_string(),
            }
            .into());
        }
        let mut writer = SplitWriter::new(split.index, spec.cluster.shards.max(1));
        if spec.features.als {
            writer = writer.with_item_routing();
        }
        Ok(Cleaner {
            spec,
            file: &split.object,
            input,
            fail_on_bad: input.clean.on_bad_rows == OnBadRows::Fail,
            user_as_integer: input.user_as_integer,
            drop_order_prefixes: &input.clean.drop_order_prefixes,
            min_quantity: input.clean.min_quantity,
            min_price: input.clean.min_price,
            time: TimeParser::new(input.time_format.as_deref())?,
            counts: [0; DropReason::ALL.len()],
            read: 0,
            kept: 0,
            min_time_ms: i64::MAX,
            max_time_ms: i64::MIN,
            writer,
            user_buf: String::new(),
            control,
        })
    }

    /// Cleans `rows` rows of `cols`; `row_number` maps a row's index in read order
    /// (over the whole split) to its 1-based data row in the file.
    fn batch(
        &mut self,
        plan: &Plan,
        cols: &Prepared,
        rows: usize,
        row_number: &dyn Fn(u64) -> u64,
    ) -> Result<(), WorkerError> {
        self.control.check()?;
        self.control
            .rows_read
            .fetch_add(rows as u64, Ordering::Relaxed);
        let Cleaner {
            spec: _,
            file,
            input,
            fail_on_bad,
            user_as_integer,
            drop_order_prefixes,
            min_quantity,
            min_price,
            time,
            counts,
            read,
            kept,
            min_time_ms,
            max_time_ms,
            writer,
            user_buf,
            control: _,
        } = self;
        let column = |role: Role| plan.slot(role).map_or("", |s| s.column.as_str());
        for i in 0..rows {
            let index = *read;
            *read += 1;
            // Counts the row under `reason`; a bad row fails the split when asked to.
            macro_rules! drop_row {
                ($reason:expr, $role:expr, $detail:expr) => {{
                    let reason: DropReason = $reason;
                    counts[reason as usize] += 1;
                    if *fail_on_bad && reason.is_bad() {
                        return Err(WorkerError::BadRow {
                            file: file.to_string(),
                            row: row_number(index),
                            reason: reason.as_str(),
                            detail: format!("column `{}`: {}", column($role), $detail),
                        });
                    }
                    continue;
                }};
            }

            // 1-2. user
            let raw_user = match cols.user.get(i) {
                Some(u) if !u.trim().is_empty() => u,
                other => drop_row!(DropReason::MissingUser, Role::User, describe_text(other)),
            };
            let user = if *user_as_integer {
                if !canonical_integer(raw_user, user_buf) {
                    drop_row!(
                        DropReason::BadUser,
                        Role::User,
                        format!("`{raw_user}` is not an integer (input.user_as_integer = true)")
                    );
                }
                user_buf.as_str()
            } else {
                raw_user
            };

            // 3. order
            let order = cols
                .order
                .as_ref()
                .and_then(|c| c.get(i))
                .filter(|o| !o.is_empty());
            if let Some(o) = order {
                let o = o.trim_start();
                if drop_order_prefixes
                    .iter()
                    .any(|p| o.starts_with(p.as_str()))
                {
                    drop_row!(DropReason::CancelledOrder, Role::Order, format!("`{o}`"));
                }
            }

            // 4. time
            let time_ms = match &cols.time {
                Times::Ms(a) => {
                    if a.is_null(i) {
                        drop_row!(DropReason::MissingTime, Role::Time, "null");
                    }
                    a.value(i)
                }
                Times::Text(t) => match t.get(i).map(str::trim) {
                    None | Some("") => {
                        drop_row!(DropReason::MissingTime, Role::Time, describe_text(t.get(i)))
                    }
                    Some(s) => match time.parse(s) {
                        Some(ms) => ms,
                        None => drop_row!(
                            DropReason::BadTime,
                            Role::Time,
                            format!("`{s}` is not a time (expected {})", time.expected())
                        ),
                    },
                },
            };

            // 5. quantity
            let quantity = match &cols.quantity {
                None => 1.0,
                Some(q) => match q.get(i) {
                    Num::Value(v) => {
                        if min_quantity.is_some_and(|min| v < min) {
                            drop_row!(DropReason::QuantityBelowMin, Role::Quantity, v);
                        }
                        v
                    }
                    Num::Missing | Num::Bad => drop_row!(
                        DropReason::BadQuantity,
                        Role::Quantity,
                        format!("{} is not a number", q.describe(i))
                    ),
                },
            };

            // 6. price
            let price = match &cols.price {
                None => None,
                Some(p) => match p.get(i) {
                    Num::Value(v) => {
                        if min_price.is_some_and(|min| v <= min) {
                            drop_row!(DropReason::PriceAtOrBelowMin, Role::Price, v);
                        }
                        Some(v)
                    }
                    Num::Missing | Num::Bad => drop_row!(
                        DropReason::BadPrice,
                        Role::Price,
                        format!("{} is not a number", p.describe(i))
                    ),
                },
            };

            // 7. amount
            let amount = match &cols.amount {
                None => None,
                Some(a) => match a.get(i) {
                    Num::Value(v) => Some(v),
                    Num::Missing | Num::Bad => drop_row!(
                        DropReason::BadAmount,
                        Role::Amount,
                        format!("{} is not a number", a.describe(i))
                    ),
                },
            };

            let monetary = match (amount, price) {
                (Some(a), _) => a,
                (None, Some(p)) => quantity * p,
                (None, None) => 0.0,
            };
            let item = cols
                .item
                .as_ref()
                .and_then(|c| c.get(i))
                .filter(|s| !s.is_empty());
            // A missing or blank event weighs 1.0: never a bad row.
            let weight = input.event_weight(cols.event.as_ref().and_then(|c| c.get(i)));
            let item_label = cols
                .item_label
                .as_ref()
                .and_then(|c| c.get(i))
                .filter(|s| !s.trim().is_empty());
            writer.push(StagedRow {
                user,
                time_ms,
                order,
                item,
                quantity,
                monetary,
                weight,
                item_label,
            });
            *kept += 1;
            *min_time_ms = (*min_time_ms).min(time_ms);
            *max_time_ms = (*max_time_ms).max(time_ms);
        }
        Ok(())
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
    /// The job's cancellation and counters.
    fn control(&self) -> &IngestControl;
}

impl Sink for (Cleaner<'_>, Option<Plan>) {
    fn plan(&mut self, schema: &Schema, file: &str) -> Result<Vec<usize>, WorkerError> {
        let plan = Plan::new(self.0.spec, schema, file)?;
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
        let cols = Prepared::new(plan, columns, self.0.file)?;
        self.0.batch(plan, &cols, rows, row_number)
    }

    fn control(&self) -> &IngestControl {
        self.0.control
    }
}

// ---------------------------------------------------------------------------
// CSV

/// Maps an I/O error from the (possibly gunzipped) object stream: object-store
/// failures stay store errors (retryable), the rest is a broken gzip stream.
fn stream_error(file: &str, gzip: bool, e: std::io::Error) -> WorkerError {
    let is_store = e
        .get_ref()
        .is_some_and(|inner| inner.is::<object_store::Error>());
    if is_store {
        let inner = e.into_inner().expect("checked above");
        let store = inner
            .downcast::<object_store::Error>()
            .expect("checked above");
        return StoreError::io(file, *store).into();
    }
    if gzip {
        WorkerError::Gzip {
            file: file.to_string(),
            source: e,
        }
    } else {
        WorkerError::Csv {
            file: file.to_string(),
            source: ArrowError::IoError(e.to_string(), e),
        }
    }
}

/// Finds the end of the first CSV record (the header) across growing input.
#[derive(Default)]
struct HeaderEnd {
    scanned: usize,
    in_quotes: bool,
}

impl HeaderEnd {
    fn find(&mut self, buf: &[u8]) -> Option<usize> {
        for (i, &b) in buf.iter().enumerate().skip(self.scanned) {
            match b {
                b'"' => self.in_quotes = !self.in_quotes,
                b'\n' | b'\r' if !self.in_quotes => return Some(i),
                _ => {}
            }
        }
        self.scanned = buf.len();
        None
    }
}

/// The input's columns, every one read as nullable text.
fn csv_schema(header: &[u8], file: &str) -> Result<Schema, WorkerError> {
    let (names, _) = arrow::csv::reader::Format::default()
        .with_header(true)
        .infer_schema(std::io::Cursor::new(header), Some(0))
        .map_err(|source| WorkerError::Csv {
            file: file.to_string(),
            source,
        })?;
    Ok(Schema::new(
        names
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ))
}

/// Reads the CSV object of `split` into `sink`; returns the bytes fetched.
pub(crate) async fn read_csv(
    split: &pb::Split,
    loc: &Location,
    sink: &mut (dyn Sink + Send),
) -> Result<u64, WorkerError> {
    let file = split.object.as_str();
    let got = loc
        .store
        .get(&loc.path)
        .await
        .map_err(|e| StoreError::io(file, e))?;
    let fetched = Arc::new(AtomicU64::new(0));
    let counter = fetched.clone();
    let job_bytes = sink.control().bytes_read.clone();
    let stream = got
        .into_stream()
        .inspect_ok(move |chunk| {
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            job_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        })
        .map_err(std::io::Error::from);
    let raw = StreamReader::new(stream);
    let mut reader: Pin<Box<dyn AsyncBufRead + Send>> = if split.gzip {
        let mut gunzip = GzipDecoder::new(raw);
        gunzip.multiple_members(true);
        Box::pin(tokio::io::BufReader::with_capacity(GUNZIP_BUFFER, gunzip))
    } else {
        Box::pin(raw)
    };
    let io_err = |e| stream_error(file, split.gzip, e);

    // The header: read until the first record ends.
    let mut head = Vec::new();
    let mut header_end = HeaderEnd::default();
    let end = loop {
        let buf = reader.fill_buf().await.map_err(io_err)?;
        if buf.is_empty() {
            break head.len();
        }
        let n = buf.len();
        head.extend_from_slice(buf);
        reader.as_mut().consume(n);
        if let Some(end) = header_end.find(&head) {
            break end;
        }
    };
    let bom = if head.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    let schema = Arc::new(csv_schema(&head[bom..end.max(bom)], file)?);
    let projection = sink.plan(&schema, file)?;

    let mut decoder = arrow::csv::ReaderBuilder::new(schema)
        .with_header(true)
        .with_batch_size(BATCH_ROWS)
        .with_projection(projection)
        .build_decoder();
    let csv_err = |source| WorkerError::Csv {
        file: file.to_string(),
        source,
    };
    let flush = |decoder: &mut Decoder, sink: &mut (dyn Sink + Send)| -> Result<(), WorkerError> {
        if let Some(batch) = decoder.flush().map_err(csv_err)? {
            sink.batch(batch.columns(), batch.num_rows(), &|index| index + 1)?;
        }
        Ok(())
    };
    // Feeds bytes to the decoder, handing every full batch to the sink.
    let feed = |decoder: &mut Decoder,
                sink: &mut (dyn Sink + Send),
                buf: &[u8]|
     -> Result<usize, WorkerError> {
        let n = decoder.decode(buf).map_err(csv_err)?;
        if decoder.capacity() == 0 {
            flush(decoder, sink)?;
        } else if n == 0 && !buf.is_empty() {
            return Err(csv_err(ArrowError::CsvError(
                "the CSV decoder made no progress".to_string(),
            )));
        }
        Ok(n)
    };

    let mut pending = &head[bom..];
    while !pending.is_empty() {
        let n = feed(&mut decoder, sink, pending)?;
        pending = &pending[n..];
    }
    loop {
        let buf = reader.fill_buf().await.map_err(io_err)?;
        if buf.is_empty() {
            break;
        }
        let n = feed(&mut decoder, sink, buf)?;
        reader.as_mut().consume(n);
    }
    // End of input: completes a last record without a line end.
    feed(&mut decoder, sink, &[])?;
    flush(&mut decoder, sink)?;
    Ok(fetched.load(Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// Parquet

/// Object-store failures under Parquet stay store errors (retryable).
fn parquet_error(file: &str, e: ParquetError) -> WorkerError {
    match e {
        ParquetError::External(inner) => match inner.downcast::<object_store::Error>() {
            Ok(store) => StoreError::io(file, *store).into(),
            Err(inner) => WorkerError::Parquet {
                file: file.to_string(),
                source: ParquetError::External(inner),
            },
        },
        source => WorkerError::Parquet {
            file: file.to_string(),
            source,
        },
    }
}

/// Selected row groups in read order: where each starts in the read order and in
/// the file.
struct Segment {
    read_start: u64,
    file_start: u64,
    rows: u64,
}

fn file_row(segments: &[Segment], index: u64) -> u64 {
    segments
        .iter()
        .find(|s| (s.read_start..s.read_start + s.rows).contains(&index))
        .map_or(index, |s| s.file_start + (index - s.read_start))
        + 1
}

/// Reads the row groups of `split` from its Parquet object into `sink`;
/// returns the bytes fetched.
pub(crate) async fn read_parquet(
    split: &pb::Split,
    loc: &Location,
    sink: &mut (dyn Sink + Send),
) -> Result<u64, WorkerError> {
    let file = split.object.as_str();
    let reader = ParquetSource::new(loc);
    let fetched = reader.fetched();
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| parquet_error(file, e))?;
    let schema = builder.schema().clone();
    let projection = sink.plan(&schema, file)?;
    sink.check_types(&schema, file)?;

    let metadata = builder.metadata().clone();
    let groups = metadata.num_row_groups();
    let selected: Vec<usize> = if split.row_groups.is_empty() {
        (0..groups).collect()
    } else {
        split.row_groups.iter().map(|&g| g as usize).collect()
    };
    if let Some(&bad) = selected.iter().find(|&&g| g >= groups) {
        return Err(WorkerError::InvalidRequest(format!(
            "split {} of {file}: row group {bad} does not exist (the file has {groups}); was the object replaced after planning?",
            split.index
        )));
    }
    let mut file_starts = Vec::with_capacity(groups);
    let mut at = 0u64;
    for g in 0..groups {
        file_starts.push(at);
        at += metadata.row_group(g).num_rows().max(0) as u64;
    }
    let mut segments = Vec::with_capacity(selected.len());
    let mut read_start = 0u64;
    for &g in &selected {
        let rows = metadata.row_group(g).num_rows().max(0) as u64;
        segments.push(Segment {
            read_start,
            file_start: file_starts[g],
            rows,
        });
        read_start += rows;
    }

    let mask = ProjectionMask::roots(builder.parquet_schema(), projection);
    let mut stream = builder
        .with_projection(mask)
        .with_row_groups(selected)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| parquet_error(file, e))?;
    let row_number = |index: u64| file_row(&segments, index);
    // fetched bytes already added to the job's counter
    let mut counted = 0u64;
    let mut count_bytes = |control: &IngestControl| {
        let now = fetched.load(Ordering::Relaxed);
        control
            .bytes_read
            .fetch_add(now.saturating_sub(counted), Ordering::Relaxed);
        counted = counted.max(now);
    };
    while let Some(batch) = stream
        .try_next()
        .await
        .map_err(|e| parquet_error(file, e))?
    {
        count_bytes(sink.control());
        let batch: RecordBatch = batch;
        sink.batch(batch.columns(), batch.num_rows(), &row_number)?;
    }
    count_bytes(sink.control());
    Ok(fetched.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::{self, read_shard};
    use arrow::array::{Float64Builder, Int64Builder, TimestampMicrosecondArray};
    use arrow::datatypes::Float64Type;
    use bytes::Bytes;
    use chrono::TimeZone;
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use shoal_proto::hash::shard_of;
    use shoal_proto::spec::DEMO_SPEC;
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

    /// Every staged row of every shard, checking each sits in its user's shard.
    async fn staged_rows(staging: &Location, shards: u32) -> Vec<Row> {
        let mut rows = Vec::new();
        for shard in 0..shards {
            for b in read_shard(staging, shard).await.unwrap() {
                let user = b.column(0).as_string::<i32>();
                let time = b.column(1).as_primitive::<Int64Type>();
                let order = b.column(2).as_string::<i32>();
                let item = b.column(3).as_string::<i32>();
                let qty = b.column(4).as_primitive::<Float64Type>();
                let money = b.column(5).as_primitive::<Float64Type>();
                for i in 0..b.num_rows() {
                    assert_eq!(
                        shard_of(user.value(i), shards),
                        shard,
                        "row routed to its user's shard"
                    );
                    rows.push((
                        user.value(i).to_string(),
                        time.value(i),
                        order.is_valid(i).then(|| order.value(i).to_string()),
                        item.is_valid(i).then(|| item.value(i).to_string()),
                        qty.value(i),
                        money.value(i),
                    ));
                }
            }
        }
        rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
        rows
    }

    fn sorted(mut rows: Vec<Row>) -> Vec<Row> {
        rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
        rows
    }

    /// user, time_ms, item, quantity, weight, item_label
    type Extra = (String, i64, Option<String>, f64, f64, Option<String>);

    /// The weight and label (with what identifies the row) of every staged row of
    /// every shard, shard by shard in file order.
    async fn staged_extras(staging: &Location, shards: u32) -> Vec<Extra> {
        let mut rows = Vec::new();
        for shard in 0..shards {
            for b in read_shard(staging, shard).await.unwrap() {
                let col = |name: &str| b.column_by_name(name).unwrap();
                let user = col(staging::USER).as_string::<i32>();
                let time = col(staging::TIME_MS).as_primitive::<Int64Type>();
                let item = col(staging::ITEM).as_string::<i32>();
                let qty = col(staging::QUANTITY).as_primitive::<Float64Type>();
                let weight = col(staging::WEIGHT).as_primitive::<Float64Type>();
                let label = col(staging::ITEM_LABEL).as_string::<i32>();
                for i in 0..b.num_rows() {
                    rows.push((
                        user.value(i).to_string(),
                        time.value(i),
                        item.is_valid(i).then(|| item.value(i).to_string()),
                        qty.value(i),
                        weight.value(i),
                        label.is_valid(i).then(|| label.value(i).to_string()),
                    ));
                }
            }
        }
        rows
    }

    /// (item, user, strength bits)
    type ItemRow = (String, String, u64);

    /// The item-routed rows of each item shard, in file order, checking each sits
    /// in its item's shard.
    async fn item_staged(staging: &Location, shards: u32) -> Vec<Vec<ItemRow>> {
        let mut out = Vec::new();
        for shard in 0..shards {
            let mut rows = Vec::new();
            for b in staging::read_item_shard(staging, shard).await.unwrap() {
                assert_eq!(b.schema(), staging::item_staged_schema());
                let item = b.column(0).as_string::<i32>();
                let user = b.column(1).as_string::<i32>();
                let strength = b.column(2).as_primitive::<Float64Type>();
                for i in 0..b.num_rows() {
                    assert_eq!(
                        shard_of(item.value(i), shards),
                        shard,
                        "row routed to its item's shard"
                    );
                    rows.push((
                        item.value(i).to_string(),
                        user.value(i).to_string(),
                        strength.value(i).to_bits(),
                    ));
                }
            }
            out.push(rows);
        }
        out
    }

    /// The item-routed rows are exactly the user-routed rows with an item, with
    /// strength bit-identical to `weight * quantity` computed from the user side.
    /// Returns how many there are.
    async fn check_items_match_users(staging: &Location, shards: u32) -> usize {
        let mut from_users: Vec<ItemRow> = staged_extras(staging, shards)
            .await
            .into_iter()
            .filter_map(|(user, _, item, qty, weight, _)| {
                let item = item.filter(|i| !i.is_empty())?;
                Some((item, user, (weight * qty).to_bits()))
            })
            .collect();
        let mut from_items: Vec<ItemRow> = item_staged(staging, shards)
            .await
            .into_iter()
            .flatten()
            .collect();
        from_users.sort();
        from_items.sort();
        assert_eq!(from_items, from_users);
        from_items.len()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        staging: Location,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let staging = resolve(&dir.path().join("staging").display().to_string()).unwrap();
            Fixture { dir, staging }
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
        let result = ingest_split(&spec, &split, &fx.staging).await.unwrap();
        let counts = result.counts.clone().unwrap();
        assert_eq!(result.split, 3);
        assert_eq!(counts.read, 18);
        assert_eq!(counts.kept, 4);
        assert_eq!(dropped_of(&result), retail_csv_dropped());
        check_balance(&result);
        assert_eq!(result.min_time_ms, utc(2010, 12, 1, 8, 26, 0));
        assert_eq!(result.max_time_ms, utc(2011, 12, 9, 11, 50, 0));
        assert_eq!(result.bytes_read, object_bytes);
        assert_eq!(
            staged_rows(&fx.staging, SHARDS).await,
            sorted(retail_kept())
        );
        // No event column: every row weighs 1.0; labels are the Description.
        let mut labels: Vec<(String, i64, f64, Option<String>)> =
            staged_extras(&fx.staging, SHARDS)
                .await
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
        assert_eq!(check_items_match_users(&fx.staging, SHARDS).await, 3);
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
        let result = ingest_split(&spec, &split_of(&url, "csv", false), &fx.staging)
            .await
            .unwrap();
        assert_eq!(result.counts.as_ref().unwrap().kept, 2);
        assert_eq!(dropped_of(&result), dropped(&[("bad_amount", 2)]));
        check_balance(&result);
        let day = |d| utc(2024, 1, d, 0, 0, 0);
        assert_eq!(
            staged_rows(&fx.staging, SHARDS).await,
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
        let err = ingest_split(&spec, &split_of(&url, "csv", false), &fx.staging)
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
        assert!(
            staged_rows(&fx.staging, SHARDS).await.is_empty(),
            "nothing staged on error"
        );
    }

    #[tokio::test]
    async fn column_names_match_ignoring_case_and_spaces() {
        let fx = Fixture::new();
        let csv = RETAIL_CSV.replacen("CustomerID", " customerid ", 1);
        let url = fx.put("retail.csv", csv.into_bytes()).await;
        let mut spec = retail_spec();
        spec.input.columns.quantity = "QUANTITY".into();
        let result = ingest_split(&spec, &split_of(&url, "csv", false), &fx.staging)
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
        let err = ingest_split(&spec, &split_of(&url, "csv", false), &fx.staging)
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
        let err = ingest_split(&spec, &split_of(&url, "csv", false), &fx.staging)
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
        let result = ingest_split(&spec, &split_of(&url, "csv", false), &fx.staging)
            .await
            .unwrap();
        assert_eq!(dropped_of(&result), dropped(&[("bad_time", 1)]));
        assert_eq!(
            staged_rows(&fx.staging, SHARDS).await,
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
        let err = ingest_split(&spec, &split_of(&url, "csv", false), &fx.staging)
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
    async fn header_only_and_bom_files() {
        let fx = Fixture::new();
        let header = RETAIL_CSV.lines().next().unwrap();
        let url = fx.put("empty.csv", header.as_bytes().to_vec()).await;
        let result = ingest_split(&retail_spec(), &split_of(&url, "csv", false), &fx.staging)
            .await
            .unwrap();
        assert_eq!(result.counts.as_ref().unwrap().read, 0);
        assert_eq!((result.min_time_ms, result.max_time_ms), (0, 0));

        let mut with_bom = b"\xEF\xBB\xBF".to_vec();
        with_bom.extend_from_slice(RETAIL_CSV.as_bytes());
        let url = fx.put("bom.csv", with_bom).await;
        let result = ingest_split(&retail_spec(), &split_of(&url, "csv", false), &fx.staging)
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
        let result = ingest_split(&spec, &split_of(&url, "csv", false), &fx.staging)
            .await
            .unwrap();
        let counts = result.counts.clone().unwrap();
        assert_eq!((counts.read, counts.kept), (11, 10));
        assert_eq!(dropped_of(&result), dropped(&[("bad_time", 1)]));
        check_balance(&result);

        let kept = events_kept();
        let mut got = staged_extras(&fx.staging, SHARDS).await;
        got.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let mut want = kept.clone();
        want.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(got, want);

        // Each item shard holds exactly the kept rows with an item whose item hashes
        // there, in file order, with strength = weight * quantity (same f64 product).
        let shards = item_staged(&fx.staging, SHARDS).await;
        let mut used = 0;
        for (shard, got) in shards.iter().enumerate() {
            let want: Vec<ItemRow> = kept
                .iter()
                .filter_map(|(user, _, item, qty, weight, _)| {
                    let item = item.as_deref()?;
                    (shard_of(item, SHARDS) == shard as u32)
                        .then(|| (item.to_string(), user.clone(), (weight * qty).to_bits()))
                })
                .collect();
            assert_eq!(got, &want, "item shard {shard}");
            used += usize::from(!got.is_empty());
        }
        assert!(used > 1, "the items spread over several shards");
        assert_eq!(check_items_match_users(&fx.staging, SHARDS).await, 9);
        let strengths: BTreeSet<u64> = shards.iter().flatten().map(|r| r.2).collect();
        assert!(strengths.contains(&(0.1f64 * 5.0).to_bits()));
        assert!(strengths.contains(&(0.5f64 * 7.0).to_bits()));

        // A blank event is not a bad row: under on_bad_rows = "fail" the first bad
        // row is still the unparseable time (row 9).
        let mut strict = spec.clone();
        strict.input.clean.on_bad_rows = OnBadRows::Fail;
        let err = ingest_split(
            &strict,
            &split_of(&url, "csv", false),
            &Fixture::new().staging,
        )
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
        ingest_split(
            &events_spec(&url, false),
            &split_of(&url, "csv", false),
            &fx2.staging,
        )
        .await
        .unwrap();
        assert!(
            item_staged(&fx2.staging, SHARDS)
                .await
                .iter()
                .all(Vec::is_empty)
        );
        let mut got = staged_extras(&fx2.staging, SHARDS).await;
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
            let err = ingest_split(&spec, &split_of(&url, "csv", false), &fx.staging)
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
        assert!(staged_rows(&fx.staging, SHARDS).await.is_empty());
        assert!(
            item_staged(&fx.staging, SHARDS)
                .await
                .iter()
                .all(Vec::is_empty)
        );
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
        let result = ingest_split(&retail_spec(), &split, &fx.staging)
            .await
            .unwrap();
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
        assert_eq!(
            staged_rows(&fx.staging, SHARDS).await,
            sorted(retail_kept())
        );
        let mut labels: Vec<(String, Option<String>)> = staged_extras(&fx.staging, SHARDS)
            .await
            .into_iter()
            .map(|r| (r.0, r.5))
            .collect();
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
        assert_eq!(check_items_match_users(&fx.staging, SHARDS).await, 3);

        // Without user_as_integer, float ids print as Rust prints them.
        let fx2 = Fixture::new();
        let mut spec = retail_spec();
        spec.input.user_as_integer = false;
        ingest_split(&spec, &split, &fx2.staging).await.unwrap();
        let users: BTreeSet<String> = staged_rows(&fx2.staging, SHARDS)
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
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
        let whole = ingest_split(&retail_spec(), &split, &Fixture::new().staging)
            .await
            .unwrap();
        split.row_groups = vec![1];
        let result = ingest_split(&retail_spec(), &split, &fx.staging)
            .await
            .unwrap();
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
        assert!(staged_rows(&fx.staging, SHARDS).await.is_empty());

        split.row_groups = vec![3, 0];
        let result = ingest_split(&retail_spec(), &split, &fx.staging)
            .await
            .unwrap();
        assert_eq!(result.counts.as_ref().unwrap().read, 6);
        assert_eq!(result.counts.as_ref().unwrap().kept, 3);

        let mut spec = retail_spec();
        spec.input.clean.on_bad_rows = OnBadRows::Fail;
        split.row_groups = vec![2];
        let err = ingest_split(&spec, &split, &fx.staging).await.unwrap_err();
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
        let err = ingest_split(&spec, &split, &fx.staging).await.unwrap_err();
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
        let err = ingest_split(&retail_spec(), &split, &fx.staging)
            .await
            .unwrap_err();
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
        let err = ingest_split(&spec, &split_of(&url, "parquet", false), &fx.staging)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, WorkerError::ColumnType { field: "time", column, .. } if column == "InvoiceDate"),
            "{err}"
        );
    }

    #[test]
    fn iso_times_in_every_default_form() {
        let t = |s: &str| parse_iso_ms(s);
        let base = utc(2010, 12, 1, 8, 26, 0);
        assert_eq!(t("2010-12-01"), Some(utc(2010, 12, 1, 0, 0, 0)));
        assert_eq!(t("2010-12-01 08:26"), Some(base));
        assert_eq!(t("2010-12-01 08:26:00"), Some(base));
        assert_eq!(t("2010-12-01T08:26:00"), Some(base));
        assert_eq!(t("2010-12-01t08:26:00"), Some(base));
        assert_eq!(t("  2010-12-01 08:26:00 \t"), Some(base));
        assert_eq!(t("2010-12-01 08:26:07.5"), Some(base + 7_500));
        assert_eq!(t("2010-12-01 08:26:07.123456789"), Some(base + 7_123));
        assert_eq!(t("2010-12-01T08:26:00Z"), Some(base));
        assert_eq!(t("2010-12-01T08:26:00.250z"), Some(base + 250));
        assert_eq!(t("2010-12-01T08:26:00+01:00"), Some(base - 3_600_000));
        assert_eq!(
            t("2010-12-01T08:26:00-05:30"),
            Some(base + 5 * 3_600_000 + 30 * 60_000)
        );
        assert_eq!(t("2010-12-01T08:26:00+0100"), Some(base - 3_600_000));
        assert_eq!(t("2010-12-01 08:26+02"), Some(base - 7_200_000));
        assert_eq!(t("2012-02-29"), Some(utc(2012, 2, 29, 0, 0, 0)));
        assert_eq!(t("1969-12-31 23:59:59"), Some(-1000));
        assert_eq!(t("1600-03-01"), Some(utc(1600, 3, 1, 0, 0, 0)));
        for bad in [
            "",
            "yesterday",
            "2011-02-29",
            "2010-13-01",
            "2010-00-10",
            "2010-12-32",
            "2010-12-01 24:00",
            "2010-12-01 08:60",
            "2010-12-01 08:26:60",
            "2010-12-01 8:26",
            "2010-12-01 08",
            "2010-12-01 08:26:00.",
            "2010-12-01 08:26:00 junk",
            "2010-12-01T08:26:00+25:00",
            "2010-12-01T08:26:00+01:",
            "2010-12-01x",
            "12/1/2010 8:26",
            "20101201",
            "2010-1-01",
        ] {
            assert_eq!(t(bad), None, "`{bad}` must not parse");
        }
    }

    #[test]
    fn iso_fast_path_agrees_with_chrono() {
        // A brute-force twin: chrono formats, the fast path parses.
        let mut ms = utc(1890, 1, 1, 0, 0, 0);
        let end = utc(2110, 1, 1, 0, 0, 0);
        let mut n = 0;
        while ms < end {
            let dt = chrono::DateTime::from_timestamp_millis(ms).unwrap();
            let naive = dt.naive_utc();
            assert_eq!(
                parse_iso_ms(&naive.format("%Y-%m-%d %H:%M:%S%.3f").to_string()),
                Some(ms)
            );
            assert_eq!(parse_iso_ms(&dt.to_rfc3339()), Some(ms));
            let date = naive.date();
            assert_eq!(
                parse_iso_ms(&date.format("%Y-%m-%d").to_string()),
                Some(
                    date.and_hms_opt(0, 0, 0)
                        .unwrap()
                        .and_utc()
                        .timestamp_millis()
                )
            );
            ms += 7_919_993_117; // ~92 days and an odd number of ms
            n += 1;
        }
        assert!(n > 800);
    }

    #[test]
    fn custom_time_formats() {
        let p = TimeParser::new(Some("%d/%m/%Y %H:%M")).unwrap();
        assert_eq!(
            p.parse("01/12/2010 08:26"),
            Some(utc(2010, 12, 1, 8, 26, 0))
        );
        assert_eq!(
            p.parse(" 01/12/2010 08:26 "),
            Some(utc(2010, 12, 1, 8, 26, 0))
        );
        assert_eq!(p.parse("2010-12-01 08:26"), None);
        assert_eq!(p.parse("garbage"), None);

        let date_only = TimeParser::new(Some("%m/%d/%Y")).unwrap();
        assert_eq!(
            date_only.parse("12/1/2010"),
            Some(utc(2010, 12, 1, 0, 0, 0))
        );
        assert_eq!(date_only.parse("13/1/2010"), None);

        let with_offset = TimeParser::new(Some("%Y-%m-%d %H:%M:%S %z")).unwrap();
        assert_eq!(
            with_offset.parse("2010-12-01 09:26:00 +0100"),
            Some(utc(2010, 12, 1, 8, 26, 0))
        );

        let default = TimeParser::new(None).unwrap();
        assert_eq!(default.parse("2010-12-01"), Some(utc(2010, 12, 1, 0, 0, 0)));

        assert!(TimeParser::new(Some("%Q")).is_err());
    }

    #[test]
    fn integer_user_ids() {
        let mut out = String::new();
        for (input, want) in [
            ("17850.0", "17850"),
            ("17850", "17850"),
            (" 17850.000 ", "17850"),
            ("17850.", "17850"),
            ("007", "7"),
            ("-12.0", "-12"),
            ("+12", "12"),
            ("-0", "0"),
            ("0.0", "0"),
            (
                "123456789012345678901234567890",
                "123456789012345678901234567890",
            ),
        ] {
            assert!(canonical_integer(input, &mut out), "{input}");
            assert_eq!(out, want, "{input}");
        }
        for bad in [
            "17850.5", "1e3", "12a", "", "-", ".0", "1.0.0", "0x10", "１２",
        ] {
            assert!(
                !canonical_integer(bad, &mut out),
                "`{bad}` is not an integer"
            );
        }
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
        let result = ingest_split(&spec, &split, &fx.staging).await.unwrap();
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
            for b in read_shard(&fx.staging, shard).await.unwrap() {
                rows += b.num_rows();
                let col = b.column(0).as_string::<i32>();
                users.extend(col.iter().flatten().map(str::to_string));
            }
        }
        assert_eq!(rows, 397_884);
        assert_eq!(users.len(), 4_338);
        eprintln!("online retail: ingest took {elapsed:?}");
    }
}
