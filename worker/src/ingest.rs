//! Ingest: read one input split, clean its rows, route them to user shards.
//!
//! A split is a whole CSV object (optionally gzip) or some row groups of a Parquet
//! object, always read through `object_store`. Every data row is counted: it is
//! either kept (and staged, see [`crate::staging`]) or dropped under exactly one
//! reason ([`DropReason`]), checked in a fixed order. Bad rows (unparseable values, missing
//! times) fail the split when `input.clean.on_bad_rows = "fail"`; cleaning drops
//! (missing users, cancellations, values below the minimums) never do.

use std::ops::Range;
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
    DataType, Date32Type, Field, Float16Type, Float32Type, Float64Type, Int64Type, Schema,
    TimeUnit, TimestampMillisecondType,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use async_compression::tokio::bufread::GzipDecoder;
use bytes::Bytes;
use chrono::format::{Item, Parsed, StrftimeItems};
use futures::future::BoxFuture;
use futures::{FutureExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{AsyncFileReader, MetadataSuffixFetch};
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use shoal_proto::pb;
use shoal_proto::spec::{Columns, Format, JobSpec, OnBadRows};
use shoal_proto::store::resolve;
use shoal_proto::{Location, SpecError, StoreError};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio_util::io::StreamReader;

use crate::error::WorkerError;
use crate::staging::{StagedRow, SplitWriter};

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
            DropReason::MissingUser | DropReason::CancelledOrder | DropReason::QuantityBelowMin | DropReason::PriceAtOrBelowMin
        )
    }
}

/// Reads split `split`, cleans its rows, routes the kept ones to user shards and
/// writes them below `staging` (one file per non-empty shard, overwriting an
/// earlier attempt of the same split).
pub async fn ingest_split(
    spec: &JobSpec,
    split: &pb::Split,
    staging: &Location,
) -> Result<pb::SplitResult, WorkerError> {
    let loc = resolve(&split.object)?;
    let format = split_format(split)?;
    let mut cleaner = Cleaner::new(spec, split)?;
    let bytes_read = match format {
        Format::Csv => read_csv(spec, split, &loc, &mut cleaner).await?,
        Format::Parquet => {
            if split.gzip {
                return Err(WorkerError::InvalidRequest(format!(
                    "split {} of {}: gzip-compressed Parquet is not supported (Parquet compresses its pages itself)",
                    split.index, split.object
                )));
            }
            read_parquet(spec, split, &loc, &mut cleaner).await?
        }
    };
    let Cleaner {
        counts,
        read,
        kept,
        min_time_ms,
        max_time_ms,
        writer,
        ..
    } = cleaner;
    let files = writer.write(staging).await?;
    let mut row_counts = pb::RowCounts {
        read,
        kept,
        ..Default::default()
    };
    for reason in DropReason::ALL {
        let n = counts[reason as usize];
        if n > 0 {
            row_counts.dropped.insert(reason.as_str().to_string(), n);
        }
    }
    tracing::debug!(
        split = split.index,
        object = %split.object,
        read,
        kept,
        files = files.len(),
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
}

impl Role {
    const ALL: [Role; 7] = [
        Role::User,
        Role::Time,
        Role::Order,
        Role::Item,
        Role::Quantity,
        Role::Price,
        Role::Amount,
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
        }
    }
}

/// Where each role's column is: its index in the input schema and its position in
/// the projected batches (the projection is the sorted, distinct input indices).
#[derive(Debug, Clone)]
struct Plan {
    projection: Vec<usize>,
    slots: [Option<Slot>; 7],
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
fn find_column(schema: &Schema, want: &str) -> Option<usize> {
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
        let mut found: [Option<usize>; 7] = [None; 7];
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
enum Text {
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
    fn get(&self, i: usize) -> Option<&str> {
        match self {
            Text::Utf8(a) => (!a.is_null(i)).then(|| a.value(i)),
            Text::Large(a) => (!a.is_null(i)).then(|| a.value(i)),
            Text::View(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

/// A number column: numeric input cast to f64, or text parsed row by row.
enum Numbers {
    F64(Float64Array),
    Text(Text),
}

/// One value of a number column.
enum Num {
    Missing,
    Bad,
    Value(f64),
}

impl Numbers {
    #[inline]
    fn get(&self, i: usize) -> Num {
        match self {
            Numbers::F64(a) => {
                if a.is_null(i) {
                    Num::Missing
                } else {
                    let v = a.value(i);
                    if v.is_finite() { Num::Value(v) } else { Num::Bad }
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
    fn describe(&self, i: usize) -> String {
        match self {
            Numbers::F64(a) if a.is_null(i) => "null".to_string(),
            Numbers::F64(a) => format!("`{}`", a.value(i)),
            Numbers::Text(t) => describe_text(t.get(i)),
        }
    }
}

fn describe_text(value: Option<&str>) -> String {
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
}

/// Unwraps dictionary encoding: the values' type is what counts.
fn decoded(array: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    match array.data_type() {
        DataType::Dictionary(_, values) => cast(array, values),
        _ => Ok(array.clone()),
    }
}

fn user_text(array: &ArrayRef) -> Result<Option<Text>, ArrowError> {
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

fn numbers(array: &ArrayRef) -> Result<Option<Numbers>, ArrowError> {
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
            let ms = cast(&array, &DataType::Timestamp(TimeUnit::Millisecond, tz.clone()))?;
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
        let required = |role: Role| WorkerError::Spec(SpecError::Invalid {
            field: if role == Role::User { "input.columns.user" } else { "input.columns.time" },
            message: "is required".to_string(),
        });
        Ok(Prepared {
            user: get(plan, columns, file, Role::User, user_text)?.ok_or_else(|| required(Role::User))?,
            time: get(plan, columns, file, Role::Time, times)?.ok_or_else(|| required(Role::Time))?,
            order: get(plan, columns, file, Role::Order, id_text)?,
            item: get(plan, columns, file, Role::Item, id_text)?,
            quantity: get(plan, columns, file, Role::Quantity, numbers)?,
            price: get(plan, columns, file, Role::Price, numbers)?,
            amount: get(plan, columns, file, Role::Amount, numbers)?,
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
                let items = StrftimeItems::new(f).parse_to_owned().map_err(|e| SpecError::Invalid {
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
        Err(_) => parsed
            .to_naive_date()
            .ok()
            .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc().timestamp_millis()),
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
    ms += i64::from(hour) * 3_600_000 + i64::from(minute) * 60_000 + i64::from(second) * 1000
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
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b == b'0') {
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
    file: &'a str,
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
}

impl<'a> Cleaner<'a> {
    fn new(spec: &'a JobSpec, split: &'a pb::Split) -> Result<Cleaner<'a>, WorkerError> {
        let input = &spec.input;
        if input.columns.time().is_none() {
            return Err(SpecError::Invalid {
                field: "input.columns.time",
                message: "is required: every staged row has an event time".to_string(),
            }
            .into());
        }
        Ok(Cleaner {
            file: &split.object,
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
            writer: SplitWriter::new(split.index, spec.cluster.shards.max(1)),
            user_buf: String::new(),
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
        let Cleaner {
            file,
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
            let order = cols.order.as_ref().and_then(|c| c.get(i)).filter(|o| !o.is_empty());
            if let Some(o) = order {
                let o = o.trim_start();
                if drop_order_prefixes.iter().any(|p| o.starts_with(p.as_str())) {
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
                    None | Some("") => drop_row!(DropReason::MissingTime, Role::Time, describe_text(t.get(i))),
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
            let item = cols.item.as_ref().and_then(|c| c.get(i)).filter(|s| !s.is_empty());
            writer.push(StagedRow {
                user,
                time_ms,
                order,
                item,
                quantity,
                monetary,
            });
            *kept += 1;
            *min_time_ms = (*min_time_ms).min(time_ms);
            *max_time_ms = (*max_time_ms).max(time_ms);
        }
        Ok(())
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
        let store = inner.downcast::<object_store::Error>().expect("checked above");
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

async fn read_csv(
    spec: &JobSpec,
    split: &pb::Split,
    loc: &Location,
    cleaner: &mut Cleaner<'_>,
) -> Result<u64, WorkerError> {
    let file = split.object.as_str();
    let got = loc
        .store
        .get(&loc.path)
        .await
        .map_err(|e| StoreError::io(file, e))?;
    let fetched = Arc::new(AtomicU64::new(0));
    let counter = fetched.clone();
    let stream = got
        .into_stream()
        .inspect_ok(move |chunk| {
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
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
    let bom = if head.starts_with(b"\xEF\xBB\xBF") { 3 } else { 0 };
    let schema = Arc::new(csv_schema(&head[bom..end.max(bom)], file)?);
    let plan = Plan::new(spec, &schema, file)?;

    let mut decoder = arrow::csv::ReaderBuilder::new(schema)
        .with_header(true)
        .with_batch_size(BATCH_ROWS)
        .with_projection(plan.projection.clone())
        .build_decoder();
    let csv_err = |source| WorkerError::Csv {
        file: file.to_string(),
        source,
    };
    let flush = |decoder: &mut Decoder, cleaner: &mut Cleaner<'_>| -> Result<(), WorkerError> {
        if let Some(batch) = decoder.flush().map_err(csv_err)? {
            let cols = Prepared::new(&plan, batch.columns(), file)?;
            cleaner.batch(&plan, &cols, batch.num_rows(), &|index| index + 1)?;
        }
        Ok(())
    };
    // Feeds bytes to the decoder, cleaning every full batch.
    let feed = |decoder: &mut Decoder, cleaner: &mut Cleaner<'_>, buf: &[u8]| -> Result<usize, WorkerError> {
        let n = decoder.decode(buf).map_err(csv_err)?;
        if decoder.capacity() == 0 {
            flush(decoder, cleaner)?;
        } else if n == 0 && !buf.is_empty() {
            return Err(csv_err(ArrowError::CsvError("the CSV decoder made no progress".to_string())));
        }
        Ok(n)
    };

    let mut pending = &head[bom..];
    while !pending.is_empty() {
        let n = feed(&mut decoder, cleaner, pending)?;
        pending = &pending[n..];
    }
    loop {
        let buf = reader.fill_buf().await.map_err(io_err)?;
        if buf.is_empty() {
            break;
        }
        let n = feed(&mut decoder, cleaner, buf)?;
        reader.as_mut().consume(n);
    }
    // End of input: completes a last record without a line end.
    feed(&mut decoder, cleaner, &[])?;
    flush(&mut decoder, cleaner)?;
    Ok(fetched.load(Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// Parquet

fn to_parquet_error(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

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

/// Reads a Parquet object through `object_store`, counting the bytes fetched.
struct ObjectReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    fetched: Arc<AtomicU64>,
}

impl ObjectReader {
    fn count(&self, n: usize) {
        self.fetched.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl AsyncFileReader for ObjectReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            let bytes = self
                .store
                .get_range(&self.path, range)
                .await
                .map_err(to_parquet_error)?;
            self.count(bytes.len());
            Ok(bytes)
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            let all = self
                .store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(to_parquet_error)?;
            self.count(all.iter().map(Bytes::len).sum());
            Ok(all)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .load_via_suffix_and_finish(self)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

/// Reads the footer without knowing the object's size, via suffix requests.
impl MetadataSuffixFetch for &mut ObjectReader {
    fn fetch_suffix(&mut self, suffix: usize) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        let options = GetOptions {
            range: Some(GetRange::Suffix(suffix as u64)),
            ..Default::default()
        };
        async move {
            let got = self
                .store
                .get_opts(&self.path, options)
                .await
                .map_err(to_parquet_error)?;
            let bytes = got.bytes().await.map_err(to_parquet_error)?;
            self.count(bytes.len());
            Ok(bytes)
        }
        .boxed()
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

async fn read_parquet(
    spec: &JobSpec,
    split: &pb::Split,
    loc: &Location,
    cleaner: &mut Cleaner<'_>,
) -> Result<u64, WorkerError> {
    let file = split.object.as_str();
    let fetched = Arc::new(AtomicU64::new(0));
    let reader = ObjectReader {
        store: loc.store.clone(),
        path: loc.path.clone(),
        fetched: fetched.clone(),
    };
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| parquet_error(file, e))?;
    let schema = builder.schema().clone();
    let plan = Plan::new(spec, &schema, file)?;
    Prepared::check_types(&plan, &schema, file)?;

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

    let mask = ProjectionMask::roots(builder.parquet_schema(), plan.projection.iter().copied());
    let mut stream = builder
        .with_projection(mask)
        .with_row_groups(selected)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| parquet_error(file, e))?;
    let row_number = |index: u64| file_row(&segments, index);
    while let Some(batch) = stream.try_next().await.map_err(|e| parquet_error(file, e))? {
        let batch: RecordBatch = batch;
        let cols = Prepared::new(&plan, batch.columns(), file)?;
        cleaner.batch(&plan, &cols, batch.num_rows(), &row_number)?;
    }
    Ok(fetched.load(Ordering::Relaxed))
}
