//! The `features.extra` table: features per user that a shop keeps beside its
//! interaction log (a profile, a survey, an embedding from another model).
//!
//! Ingest reads each split of the table with the interactions' readers (CSV or
//! Parquet, from any object store), checks every row and routes it to its
//! user's shard (`shard_of(user, shards)`, as for the interactions):
//!
//! ```text
//! {staging}/extra/shard-{shard:05}/split-{split:05}.parquet
//! ```
//!
//! A feature column is a number (CSV: any column; Parquet: a numeric column, or
//! text holding numbers) or, in Parquet, a list of numbers of one length (a
//! vector, which becomes that many features). Every row is counted: kept, or
//! dropped under one reason ([`ExtraDrop`]); a null value (or a null element of a
//! list) is missing and takes the feature's mean later, never a bad row.
//!
//! Loading a shard joins its rows to the shard's users ([`ShardExtra::join`]): a
//! user without a row has every feature missing; a row whose user has no
//! interactions is an orphan (not segmented in training; assigned from these
//! features alone in a fold-in). Two rows for one user fail the job, naming both.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Builder, Float64Array, GenericListArray, ListBuilder,
    OffsetSizeTrait, StringBuilder, UInt64Builder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use shoal_proto::pb;
use shoal_spec::hash::shard_of;
use shoal_spec::spec::{JobSpec, OnBadRows};
use shoal_store::Location;
use shoal_store::resolve;

use crate::error::WorkerError;
use crate::ingest::{
    IngestControl, Num, Numbers, Sink, canonical_integer, count_malformed, decoded, describe_text,
    find_column, numbers, read_split, user_text,
};

/// Why a row of the table was dropped; checked in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraDrop {
    /// A CSV record with another number of fields than the header, or a read
    /// field that is not UTF-8.
    MalformedRow,
    MissingUser,
    BadUser,
    /// A value that is not a finite number (or does not fit a float32).
    BadValue,
    /// A list of another length than the split's first one of that column.
    BadVector,
}

impl ExtraDrop {
    pub const ALL: [ExtraDrop; 5] = [
        ExtraDrop::MalformedRow,
        ExtraDrop::MissingUser,
        ExtraDrop::BadUser,
        ExtraDrop::BadValue,
        ExtraDrop::BadVector,
    ];

    /// The key in `RowCounts.dropped`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtraDrop::MalformedRow => "malformed_row",
            ExtraDrop::MissingUser => "missing_user",
            ExtraDrop::BadUser => "bad_user",
            ExtraDrop::BadValue => "bad_value",
            ExtraDrop::BadVector => "bad_vector",
        }
    }

    /// Bad rows fail the split under `on_bad_rows = "fail"`; a missing user is a
    /// cleaning drop, as in the interactions.
    fn is_bad(self) -> bool {
        self != ExtraDrop::MissingUser
    }
}

// ---------------------------------------------------------------------------
// Staging

/// Column names of a staged file: the user, where the row came from, then one
/// `list<float32>` per feature column (`f0`, `f1`, …; null when missing, NaN for a
/// missing element of a list).
pub const USER: &str = "user";
pub const FILE: &str = "file";
pub const ROW: &str = "row";

/// The schema of a staged file of a table with `columns` feature columns.
pub fn staged_schema(columns: usize) -> SchemaRef {
    let mut fields = vec![
        Field::new(USER, DataType::Utf8, false),
        Field::new(FILE, DataType::Utf8, false),
        Field::new(ROW, DataType::UInt64, false),
    ];
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    fields.extend(
        (0..columns).map(|c| Field::new(format!("f{c}"), DataType::List(item.clone()), true)),
    );
    Arc::new(Schema::new(fields))
}

/// The folder holding every staged extra file of `shard`.
pub fn shard_prefix(staging: &Location, shard: u32) -> Location {
    staging.child(&format!("extra/shard-{shard:05}"))
}

fn split_file(staging: &Location, shard: u32, split: u32) -> Location {
    shard_prefix(staging, shard).child(&format!("split-{split:05}.parquet"))
}

/// The staged rows of one shard, while a split is read.
struct ShardBuffer {
    users: StringBuilder,
    files: StringBuilder,
    rows: UInt64Builder,
    values: Vec<ListBuilder<Float32Builder>>,
    len: usize,
}

impl ShardBuffer {
    fn new(columns: usize) -> ShardBuffer {
        ShardBuffer {
            users: StringBuilder::new(),
            files: StringBuilder::new(),
            rows: UInt64Builder::new(),
            values: (0..columns)
                .map(|_| ListBuilder::new(Float32Builder::new()))
                .collect(),
            len: 0,
        }
    }

    fn push(&mut self, user: &str, file: &str, row: u64, values: &[Option<Vec<f32>>]) {
        self.users.append_value(user);
        self.files.append_value(file);
        self.rows.append_value(row);
        for (b, v) in self.values.iter_mut().zip(values) {
            match v {
                Some(v) => {
                    b.values().append_slice(v);
                    b.append(true);
                }
                None => b.append(false),
            }
        }
        self.len += 1;
    }

    fn finish(mut self, schema: SchemaRef) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.users.finish()),
            Arc::new(self.files.finish()),
            Arc::new(self.rows.finish()),
        ];
        cols.extend(
            self.values
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        RecordBatch::try_new(schema, cols)
    }
}

// ---------------------------------------------------------------------------
// Ingest

/// A feature column of the file being read.
#[derive(Debug, Clone)]
struct Planned {
    name: String,
    /// Position in the projected batch.
    pos: usize,
    /// A list of numbers (else a number).
    vector: bool,
}

/// Reads one split of the table: the [`Sink`] of the readers.
struct Reader<'a> {
    spec: &'a JobSpec,
    file: &'a str,
    control: &'a IngestControl,
    fail_on_bad: bool,
    shards: u32,
    user_pos: usize,
    user_column: String,
    planned: Vec<Planned>,
    /// Per feature column: its length in this split (1 for a number; a list's,
    /// from the first non-null one).
    dims: Vec<Option<usize>>,
    buffers: Vec<Option<ShardBuffer>>,
    counts: [u64; ExtraDrop::ALL.len()],
    read: u64,
    kept: u64,
    user_buf: String,
    row_values: Vec<Option<Vec<f32>>>,
}

/// The type a Parquet feature column must have: a number, text (parsed as
/// numbers), or a list of numbers. `Some(true)` for a list.
fn column_kind(data_type: &DataType) -> Option<bool> {
    let number = |t: &DataType| t.is_numeric() || *t == DataType::Null;
    match data_type {
        DataType::Dictionary(_, values) => column_kind(values),
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            number(f.data_type()).then_some(true)
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Some(false),
        t if number(t) => Some(false),
        _ => None,
    }
}

impl Sink for Reader<'_> {
    fn plan(&mut self, schema: &Schema, file: &str) -> Result<Vec<usize>, WorkerError> {
        let present = || schema.fields().iter().map(|f| f.name().clone()).collect();
        let user = find_column(schema, &self.user_column).ok_or_else(|| {
            WorkerError::ExtraMissingColumn {
                file: file.to_string(),
                field: if self.spec.features.extra_user.is_empty() {
                    "features.extra_user, by default input.columns.user"
                } else {
                    "features.extra_user"
                },
                column: self.user_column.clone(),
                present: present(),
            }
        })?;
        let wanted = &self.spec.features.extra_columns;
        let features: Vec<usize> = if wanted.is_empty() {
            (0..schema.fields().len()).filter(|&i| i != user).collect()
        } else {
            wanted
                .iter()
                .map(|w| {
                    find_column(schema, w).ok_or_else(|| WorkerError::ExtraMissingColumn {
                        file: file.to_string(),
                        field: "features.extra_columns",
                        column: w.clone(),
                        present: present(),
                    })
                })
                .collect::<Result<_, _>>()?
        };
        if features.is_empty() {
            return Err(WorkerError::InvalidRequest(format!(
                "the features.extra table {file} has no feature column beside its user column `{}`",
                self.user_column
            )));
        }
        let mut projection: Vec<usize> = features.iter().copied().chain([user]).collect();
        projection.sort_unstable();
        projection.dedup();
        let pos = |i: usize| projection.binary_search(&i).expect("projected");
        self.user_pos = pos(user);
        self.planned = features
            .iter()
            .map(|&i| Planned {
                name: schema.field(i).name().clone(),
                pos: pos(i),
                vector: column_kind(schema.field(i).data_type()) == Some(true),
            })
            .collect();
        self.dims = self
            .planned
            .iter()
            .map(|p| (!p.vector).then_some(1))
            .collect();
        Ok(projection)
    }

    fn check_types(&self, schema: &Schema, file: &str) -> Result<(), WorkerError> {
        for p in &self.planned {
            let field = schema
                .fields()
                .iter()
                .find(|f| *f.name() == p.name)
                .expect("planned from this schema");
            if column_kind(field.data_type()).is_none() {
                return Err(WorkerError::ColumnType {
                    file: file.to_string(),
                    field: "features.extra (a number or a list of numbers per user)",
                    column: p.name.clone(),
                    data_type: field.data_type().to_string(),
                });
            }
        }
        Ok(())
    }

    fn batch(
        &mut self,
        columns: &[ArrayRef],
        rows: usize,
        row_number: &dyn Fn(u64) -> u64,
    ) -> Result<(), WorkerError> {
        self.control.check()?;
        self.control
            .rows_read
            .fetch_add(rows as u64, Ordering::Relaxed);
        let arrow_err = |source| WorkerError::Arrow {
            file: self.file.to_string(),
            source,
        };
        let users = user_text(&columns[self.user_pos])
            .map_err(arrow_err)?
            .ok_or_else(|| WorkerError::ColumnType {
                file: self.file.to_string(),
                field: "features.extra_user",
                column: self.user_column.clone(),
                data_type: columns[self.user_pos].data_type().to_string(),
            })?;
        let mut values = Vec::with_capacity(self.planned.len());
        for p in &self.planned {
            let array = decoded(&columns[p.pos]).map_err(arrow_err)?;
            let v = if p.vector {
                Values::List(list_values(&array).map_err(arrow_err)?)
            } else {
                Values::Number(numbers(&array).map_err(arrow_err)?.ok_or_else(|| {
                    WorkerError::ColumnType {
                        file: self.file.to_string(),
                        field: "features.extra (a number per user)",
                        column: p.name.clone(),
                        data_type: array.data_type().to_string(),
                    }
                })?)
            };
            values.push(v);
        }
        'rows: for i in 0..rows {
            let index = self.read;
            self.read += 1;
            macro_rules! drop_row {
                ($reason:expr, $column:expr, $detail:expr) => {{
                    let reason: ExtraDrop = $reason;
                    self.counts[reason as usize] += 1;
                    if self.fail_on_bad && reason.is_bad() {
                        return Err(WorkerError::BadRow {
                            file: self.file.to_string(),
                            row: row_number(index),
                            reason: reason.as_str(),
                            detail: format!("features.extra column `{}`: {}", $column, $detail),
                        });
                    }
                    continue 'rows;
                }};
            }
            let user_column = self.user_column.as_str();
            let raw = match users.get(i) {
                Some(u) if !u.trim().is_empty() => u,
                other => drop_row!(ExtraDrop::MissingUser, user_column, describe_text(other)),
            };
            let user = if self.spec.input.user_as_integer {
                if !canonical_integer(raw, &mut self.user_buf) {
                    drop_row!(
                        ExtraDrop::BadUser,
                        user_column,
                        format!("`{raw}` is not an integer (input.user_as_integer = true)")
                    );
                }
                self.user_buf.clone()
            } else {
                raw.to_string()
            };
            self.row_values.clear();
            for (c, v) in values.iter().enumerate() {
                let name = &self.planned[c].name;
                match v {
                    Values::Number(n) => match n.get(i) {
                        Num::Missing => self.row_values.push(None),
                        Num::Bad => drop_row!(
                            ExtraDrop::BadValue,
                            name,
                            format!("{} is not a finite number", n.describe(i))
                        ),
                        Num::Value(x) => {
                            let f = x as f32;
                            if !f.is_finite() {
                                drop_row!(
                                    ExtraDrop::BadValue,
                                    name,
                                    format!("{x} does not fit a float32")
                                );
                            }
                            self.row_values.push(Some(vec![f]));
                        }
                    },
                    Values::List(l) => {
                        if l.is_null(i) {
                            self.row_values.push(None);
                            continue;
                        }
                        let (start, len) = l.range(i);
                        let want = *self.dims[c].get_or_insert(len);
                        if len != want {
                            drop_row!(
                                ExtraDrop::BadVector,
                                name,
                                format!(
                                    "a list of {len} values; this file's lists in that column have {want}"
                                )
                            );
                        }
                        let mut out = Vec::with_capacity(len);
                        for j in start..start + len {
                            if l.values.is_null(j) {
                                out.push(f32::NAN);
                                continue;
                            }
                            let x = l.values.value(j);
                            let f = x as f32;
                            if !f.is_finite() {
                                drop_row!(
                                    ExtraDrop::BadValue,
                                    name,
                                    format!("element {} is {x}, not a finite float32", j - start)
                                );
                            }
                            out.push(f);
                        }
                        self.row_values.push(Some(out));
                    }
                }
            }
            let shard = shard_of(&user, self.shards) as usize;
            let columns = self.planned.len();
            self.buffers[shard]
                .get_or_insert_with(|| ShardBuffer::new(columns))
                .push(&user, self.file, row_number(index), &self.row_values);
            self.kept += 1;
        }
        Ok(())
    }

    fn malformed(&mut self, row: u64, detail: String) -> Result<(), WorkerError> {
        let count = &mut self.counts[ExtraDrop::MalformedRow as usize];
        let bad = (self.file, row, ExtraDrop::MalformedRow.as_str(), detail);
        count_malformed(self.control, &mut self.read, count, self.fail_on_bad, bad)
    }

    fn control(&self) -> &IngestControl {
        self.control
    }
}

/// A feature column of one batch.
enum Values {
    Number(Numbers),
    List(Lists),
}

/// A list column of one batch: offsets and its values as f64.
struct Lists {
    offsets: Vec<usize>,
    nulls: Option<arrow::buffer::NullBuffer>,
    values: Float64Array,
}

impl Lists {
    fn is_null(&self, i: usize) -> bool {
        self.nulls.as_ref().is_some_and(|n| n.is_null(i))
    }

    /// Where row `i`'s values start, and how many there are.
    fn range(&self, i: usize) -> (usize, usize) {
        (self.offsets[i], self.offsets[i + 1] - self.offsets[i])
    }
}

fn list_values(array: &ArrayRef) -> Result<Lists, arrow::error::ArrowError> {
    Ok(match array.data_type() {
        DataType::List(_) => offset_lists(array.as_list::<i32>())?,
        DataType::LargeList(_) => offset_lists(array.as_list::<i64>())?,
        DataType::FixedSizeList(_, n) => {
            let l = array.as_fixed_size_list();
            let n = *n as usize;
            // The child values of a sliced array start at the slice's first list.
            let base = if l.is_empty() {
                0
            } else {
                l.value_offset_at(0)
            };
            Lists {
                offsets: (0..=l.len()).map(|i| base + i * n).collect(),
                nulls: l.nulls().cloned(),
                values: values_f64(l.values())?,
            }
        }
        other => {
            return Err(arrow::error::ArrowError::InvalidArgumentError(format!(
                "{other} is not a list"
            )));
        }
    })
}

/// A list or large list column as [`Lists`].
fn offset_lists<O: OffsetSizeTrait>(
    l: &GenericListArray<O>,
) -> Result<Lists, arrow::error::ArrowError> {
    Ok(Lists {
        offsets: l.offsets().iter().map(|o| o.as_usize()).collect(),
        nulls: l.nulls().cloned(),
        values: values_f64(l.values())?,
    })
}

/// A list column's child values as f64.
fn values_f64(values: &ArrayRef) -> Result<Float64Array, arrow::error::ArrowError> {
    Ok(cast(values, &DataType::Float64)?
        .as_primitive::<Float64Type>()
        .clone())
}

/// Reads split `split` of the `features.extra` table, checks its rows and stages
/// them per user shard below `staging` (overwriting an earlier attempt).
pub async fn ingest_split(
    spec: &JobSpec,
    split: &pb::Split,
    staging: &Location,
    control: &IngestControl,
) -> Result<pb::ExtraSplitResult, WorkerError> {
    control.check()?;
    let loc = resolve(&split.object)?;
    let shards = spec.cluster.shards.max(1);
    let mut reader = Reader {
        spec,
        file: &split.object,
        control,
        fail_on_bad: spec.input.clean.on_bad_rows == OnBadRows::Fail,
        shards,
        user_pos: 0,
        user_column: spec.extra_user_column().to_string(),
        planned: Vec::new(),
        dims: Vec::new(),
        buffers: (0..shards).map(|_| None).collect(),
        counts: [0; ExtraDrop::ALL.len()],
        read: 0,
        kept: 0,
        user_buf: String::new(),
        row_values: Vec::new(),
    };
    let bytes_read = read_split(split, &loc, &mut reader).await?;
    control.check()?;
    let schema = staged_schema(reader.planned.len());
    let mut encoded = Vec::new();
    for (shard, buffer) in reader.buffers.into_iter().enumerate() {
        let Some(buffer) = buffer.filter(|b| b.len > 0) else {
            continue;
        };
        let file = split_file(staging, shard as u32, split.index);
        let batch = buffer
            .finish(schema.clone())
            .map_err(|source| WorkerError::Arrow {
                file: file.url(),
                source,
            })?;
        let bytes = shoal_store::encode_parquet(batch.schema(), &[batch]).map_err(|source| {
            WorkerError::Parquet {
                file: file.url(),
                source,
            }
        })?;
        encoded.push((file, bytes::Bytes::from(bytes)));
    }
    crate::staging::put_all(encoded).await?;
    let counts = crate::ingest::row_counts(
        reader.read,
        reader.kept,
        ExtraDrop::ALL.map(|r| (r.as_str(), reader.counts[r as usize])),
    );
    tracing::debug!(
        split = split.index,
        object = %split.object,
        read = reader.read,
        kept = reader.kept,
        "ingested a split of the features.extra table"
    );
    Ok(pb::ExtraSplitResult {
        split: split.index,
        counts: Some(counts),
        bytes_read,
        columns: reader
            .planned
            .iter()
            .zip(&reader.dims)
            .map(|(p, d)| pb::ExtraColumn {
                name: p.name.clone(),
                dims: d.unwrap_or(0) as u32,
            })
            .collect(),
    })
}

// ---------------------------------------------------------------------------
// Load

/// One user's row of the table: the features (`dims` long, NaN when missing) and
/// where it came from (the input file, an index into [`ShardExtra::files`], and
/// its 1-based data row).
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraRow {
    pub values: Vec<f32>,
    pub file: u32,
    pub row: u64,
}

/// The staged rows of one shard, by user.
#[derive(Debug, Default)]
pub struct ShardExtra {
    pub rows: HashMap<String, ExtraRow>,
    /// The input files the rows came from.
    pub files: Vec<String>,
}

/// Features of a shard's users from the table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Joined {
    /// Row-major, `dims` per user in the shard's user order; NaN when missing.
    pub values: Vec<f32>,
    /// Users with a row in the table.
    pub users_with_row: u64,
    /// Values missing (no row, a null, a null list element).
    pub missing: u64,
    /// The rows whose user has no interactions, by user id.
    pub orphans: Vec<(String, Vec<f32>)>,
}

pub use shoal_proto::extra::{dims, feature_names};

impl ShardExtra {
    /// Reads the staged rows of `shard` (files in split order) for a table of
    /// `columns`; two rows for one user are an error naming both.
    pub async fn read(
        staging: &Location,
        shard: u32,
        columns: &[pb::ExtraColumn],
    ) -> Result<ShardExtra, WorkerError> {
        let prefix = shard_prefix(staging, shard);
        let expected = staged_schema(columns.len());
        let mut metas = prefix.list().await?;
        metas.sort_by(|a, b| a.location.cmp(&b.location));
        let mut out = ShardExtra::default();
        let d = dims(columns);
        for meta in metas {
            if !meta
                .location
                .filename()
                .is_some_and(|n| n.starts_with("split-") && n.ends_with(".parquet"))
            {
                continue;
            }
            let file = prefix.at(meta.location);
            let url = file.url();
            let parquet_err = |source| WorkerError::Parquet {
                file: url.clone(),
                source,
            };
            let bytes = file.get().await?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .map_err(parquet_err)?
                .build()
                .map_err(parquet_err)?;
            for batch in reader {
                let batch = batch.map_err(|source| WorkerError::Arrow {
                    file: url.clone(),
                    source,
                })?;
                if batch.schema().fields().len() != expected.fields().len() {
                    return Err(WorkerError::InvalidRequest(format!(
                        "{url}: a staged features.extra file with {} feature columns, the table has {}; was the staging prefix shared with another job?",
                        batch.num_columns().saturating_sub(3),
                        columns.len()
                    )));
                }
                out.add(&batch, columns, d, &url)?;
            }
        }
        Ok(out)
    }

    fn add(
        &mut self,
        batch: &RecordBatch,
        columns: &[pb::ExtraColumn],
        d: usize,
        url: &str,
    ) -> Result<(), WorkerError> {
        let bad = |detail: String| {
            WorkerError::InvalidRequest(format!(
                "{url}: not a staged features.extra file: {detail}"
            ))
        };
        let users = batch
            .column(0)
            .as_string_opt::<i32>()
            .ok_or_else(|| bad("user is not text".into()))?;
        let files = batch
            .column(1)
            .as_string_opt::<i32>()
            .ok_or_else(|| bad("file is not text".into()))?;
        let rows = batch
            .column(2)
            .as_primitive_opt::<arrow::datatypes::UInt64Type>()
            .ok_or_else(|| bad("row is not u64".into()))?;
        let lists: Vec<_> = (0..columns.len())
            .map(|c| {
                batch
                    .column(3 + c)
                    .as_list_opt::<i32>()
                    .ok_or_else(|| bad(format!("f{c} is not a list")))
            })
            .collect::<Result<_, _>>()?;
        for i in 0..batch.num_rows() {
            let mut values = Vec::with_capacity(d);
            for (c, l) in lists.iter().enumerate() {
                let want = columns[c].dims as usize;
                if l.is_null(i) {
                    values.extend(std::iter::repeat_n(f32::NAN, want));
                    continue;
                }
                let v = l.value(i);
                let v = v
                    .as_primitive_opt::<arrow::datatypes::Float32Type>()
                    .ok_or_else(|| bad(format!("f{c} does not hold float32")))?;
                if v.len() != want {
                    return Err(WorkerError::InvalidRequest(format!(
                        "features.extra column `{}` has {} values in {} row {}, the table's other files have {want}; give every row of a list column the same length",
                        columns[c].name,
                        v.len(),
                        files.value(i),
                        rows.value(i)
                    )));
                }
                values
                    .extend((0..v.len()).map(|j| if v.is_null(j) { f32::NAN } else { v.value(j) }));
            }
            let user = users.value(i).to_string();
            let file = files.value(i);
            if self.files.last().is_none_or(|f| f != file) {
                self.files.push(file.to_string());
            }
            let row = ExtraRow {
                values,
                file: (self.files.len() - 1) as u32,
                row: rows.value(i),
            };
            if let Some(first) = self.rows.get(&user) {
                return Err(WorkerError::DuplicateExtraUser {
                    user,
                    first: format!("{} row {}", self.files[first.file as usize], first.row),
                    second: format!("{file} row {}", row.row),
                });
            }
            self.rows.insert(user, row);
        }
        Ok(())
    }

    /// The features of `users` (a shard's users, in its order), `dims` each.
    pub fn join(mut self, users: &crate::ids::IdTable, dims: usize) -> Joined {
        let mut out = Joined {
            values: Vec::with_capacity(users.len() * dims),
            ..Default::default()
        };
        for u in users.ids().iter().flatten() {
            match self.rows.remove(u) {
                Some(row) => {
                    out.users_with_row += 1;
                    out.missing += row.values.iter().filter(|v| v.is_nan()).count() as u64;
                    out.values.extend_from_slice(&row.values);
                }
                None => {
                    out.missing += dims as u64;
                    out.values.extend(std::iter::repeat_n(f32::NAN, dims));
                }
            }
        }
        let mut orphans: Vec<(String, Vec<f32>)> =
            self.rows.into_iter().map(|(u, r)| (u, r.values)).collect();
        orphans.sort_by(|a, b| a.0.cmp(&b.0));
        out.orphans = orphans;
        out
    }
}

/// Moments (count, mean, M2) of every feature over the values present (not NaN).
pub fn moments(values: &[f32], dims: usize) -> Vec<pb::Moments> {
    let mut m = vec![pb::Moments::default(); dims];
    if dims == 0 {
        return m;
    }
    for row in values.chunks_exact(dims) {
        for (s, &x) in m.iter_mut().zip(row) {
            if !x.is_nan() {
                crate::steps::load::add_to_moments(s, f64::from(x));
            }
        }
    }
    m
}

/// The staged block of one user: `(x − mean) / scale · weight`, 0 where missing.
pub fn scaled(
    values: &[f32],
    mean: &[f64],
    scale: &[f64],
    weight: f64,
) -> impl Iterator<Item = f32> {
    values.iter().zip(mean).zip(scale).map(move |((&x, m), s)| {
        if x.is_nan() {
            0.0
        } else {
            ((f64::from(x) - m) / s * weight) as f32
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        DictionaryArray, FixedSizeListBuilder, Float64Builder, Int32Array, LargeListBuilder,
    };
    use arrow::datatypes::Int32Type;
    use bytes::Bytes;
    use parquet::arrow::ArrowWriter;
    use shoal_spec::spec::DEMO_SPEC;

    const SHARDS: u32 = 3;

    fn spec() -> JobSpec {
        let mut s = JobSpec::parse(DEMO_SPEC).unwrap();
        s.input.user_as_integer = true;
        s.cluster.shards = SHARDS;
        s.features.extra = "t.parquet".into();
        s
    }

    fn split(object: &str) -> pb::Split {
        pb::Split {
            index: 2,
            object: object.to_string(),
            size: 0,
            format: String::new(),
            row_groups: Vec::new(),
            gzip: false,
        }
    }

    /// Every staged row of every shard, by user.
    async fn staged(staging: &Location, columns: &[pb::ExtraColumn]) -> HashMap<String, ExtraRow> {
        let mut all = HashMap::new();
        for shard in 0..SHARDS {
            let rows = ShardExtra::read(staging, shard, columns)
                .await
                .unwrap()
                .rows;
            for (u, r) in rows {
                assert_eq!(shard_of(&u, SHARDS), shard, "user {u} in its shard");
                all.insert(u, r);
            }
        }
        all
    }

    #[tokio::test]
    async fn parquet_lists_of_every_layout_numbers_and_nulls_are_staged_and_joined() {
        let dir = tempfile::tempdir().unwrap();
        let staging = resolve(&dir.path().join("staging").display().to_string()).unwrap();
        // Users as floats (`user_as_integer`), a fixed-size list of f64, a large
        // list with a null element and a null list, and a dictionary of ints.
        let mut fixed = FixedSizeListBuilder::new(Float64Builder::new(), 2);
        let mut large = LargeListBuilder::new(Float32Builder::new());
        for i in 0..4 {
            fixed.values().append_slice(&[i as f64, 10.0 + i as f64]);
            fixed.append(true);
            match i {
                1 => large.append(false),
                2 => {
                    large.values().append_value(1.5);
                    large.values().append_null();
                    large.values().append_value(3.5);
                    large.append(true);
                }
                _ => {
                    large.values().append_slice(&[i as f32; 3]);
                    large.append(true);
                }
            }
        }
        let dict: DictionaryArray<Int32Type> = DictionaryArray::try_new(
            Int32Array::from(vec![0, 1, 0, 1]),
            Arc::new(Int32Array::from(vec![7, 9])),
        )
        .unwrap();
        let users = Arc::new(Float64Array::from(vec![17850.0, 12346.0, 13047.0, 12347.0]));
        let batch = RecordBatch::try_from_iter(vec![
            ("CustomerID", users as ArrayRef),
            ("fixed", Arc::new(fixed.finish()) as ArrayRef),
            ("large", Arc::new(large.finish()) as ArrayRef),
            ("level", Arc::new(dict) as ArrayRef),
        ])
        .unwrap();
        let mut w = ArrowWriter::try_new(Vec::new(), batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        let file = resolve(&dir.path().join("t.parquet").display().to_string()).unwrap();
        file.put(Bytes::from(w.into_inner().unwrap()))
            .await
            .unwrap();

        let control = IngestControl::default();
        let got = ingest_split(&spec(), &split(&file.url()), &staging, &control)
            .await
            .unwrap();
        assert_eq!(got.counts.as_ref().unwrap().read, 4);
        assert_eq!(got.counts.as_ref().unwrap().kept, 4);
        let layout: Vec<(String, u32)> = got
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.dims))
            .collect();
        assert_eq!(
            layout,
            [
                ("fixed".into(), 2),
                ("large".into(), 3),
                ("level".into(), 1)
            ]
        );
        let rows = staged(&staging, &got.columns).await;
        assert_eq!(rows["17850"].values, [0.0, 10.0, 0.0, 0.0, 0.0, 7.0]);
        let v = &rows["12346"].values;
        assert_eq!(&v[..2], [1.0, 11.0]);
        assert!(
            v[2..5].iter().all(|x| x.is_nan()),
            "a null list: every value missing"
        );
        assert_eq!(v[5], 9.0);
        let v = &rows["13047"].values;
        assert_eq!((v[2], v[4]), (1.5, 3.5));
        assert!(v[3].is_nan(), "a null element: that value missing");
        assert_eq!(rows["12347"].row, 4);

        // Joined to a shard's users: one without a row, one orphan.
        let shard = shard_of("17850", SHARDS);
        let table = ShardExtra::read(&staging, shard, &got.columns)
            .await
            .unwrap();
        let mut users: Vec<String> = rows
            .keys()
            .filter(|u| shard_of(u, SHARDS) == shard)
            .cloned()
            .collect();
        users.sort();
        let orphan = users.pop();
        users.push("99999".into());
        users.sort();
        let mut keyed: Vec<(u64, &str)> = users
            .iter()
            .map(|u| (shoal_spec::hash::id_key(u), u.as_str()))
            .collect();
        keyed.sort_unstable();
        let ids = crate::ids::IdTable::new(
            keyed.iter().map(|p| p.0).collect(),
            arrow::array::StringArray::from(keyed.iter().map(|p| p.1).collect::<Vec<_>>()),
        );
        let joined = table.join(&ids, 6);
        assert_eq!(joined.values.len(), users.len() * 6);
        assert_eq!(joined.users_with_row, users.len() as u64 - 1);
        let missing_in_rows: u64 = users
            .iter()
            .filter_map(|u| rows.get(u))
            .map(|r| r.values.iter().filter(|x| x.is_nan()).count() as u64)
            .sum();
        assert_eq!(joined.missing, missing_in_rows + 6);
        assert_eq!(
            joined
                .orphans
                .iter()
                .map(|o| Some(o.0.clone()))
                .collect::<Vec<_>>(),
            [orphan]
        );
        let at = users.iter().position(|u| u == "99999").unwrap();
        assert!(
            joined.values[at * 6..(at + 1) * 6]
                .iter()
                .all(|x| x.is_nan())
        );
    }

    #[tokio::test]
    async fn bad_rows_are_counted_or_fail_the_split_as_the_spec_says() {
        let dir = tempfile::tempdir().unwrap();
        let staging = resolve(&dir.path().join("staging").display().to_string()).unwrap();
        let file = resolve(&dir.path().join("t.csv").display().to_string()).unwrap();
        let text = "CustomerID,age,spend\n17850.0,30,1e3\n,31,2\n1.5,32,3\n12346,abc,4\n12347,33,1e39\n13047,,5\n";
        file.put(Bytes::from(text)).await.unwrap();
        let control = IngestControl::default();
        let got = ingest_split(&spec(), &split(&file.url()), &staging, &control)
            .await
            .unwrap();
        let c = got.counts.unwrap();
        assert_eq!((c.read, c.kept), (6, 2));
        let mut dropped: Vec<(&str, u64)> =
            c.dropped.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        dropped.sort();
        assert_eq!(
            dropped,
            [("bad_user", 1), ("bad_value", 2), ("missing_user", 1)]
        );
        let rows = staged(&staging, &got.columns).await;
        assert_eq!(rows["17850"].values, [30.0, 1000.0]);
        let blank = &rows["13047"].values;
        assert!(
            blank[0].is_nan() && blank[1] == 5.0,
            "a blank is missing, not bad"
        );

        let mut strict = spec();
        strict.input.clean.on_bad_rows = OnBadRows::Fail;
        let err = ingest_split(&strict, &split(&file.url()), &staging, &control)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.csv, row 3") && err.contains("bad_user"),
            "{err}"
        );

        // Moments skip what is missing.
        let m = moments(&[1.0, f32::NAN, 3.0, 4.0], 2);
        assert_eq!((m[0].count, m[0].mean), (2, 2.0));
        assert_eq!((m[1].count, m[1].mean), (1, 4.0));
        let scaled: Vec<f32> = scaled(&[3.0, f32::NAN], &[1.0, 2.0], &[2.0, 1.0], 0.5).collect();
        assert_eq!(scaled, [0.5, 0.0]);
    }
}
