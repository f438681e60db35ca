//! CSV splits: one object (optionally gzip, several members allowed), split into
//! records by `csv-core` and handed on in batches of text columns. A record that
//! is not a row of the header's columns (another number of fields, an unclosed
//! quote that swallowed the rest of the file, a read field that is not UTF-8) is a
//! malformed row: counted like any bad row, or the split's error under
//! `on_bad_rows = "fail"`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::{ArrayRef, StringArray};
use arrow::buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use async_compression::tokio::bufread::GzipDecoder;
use csv_core::ReadRecordResult;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use shoal_proto::pb;
use shoal_store::{Location, StoreError};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};
use tokio_util::io::StreamReader;

use super::{BATCH_ROWS, Sink};
use crate::error::WorkerError;

/// Bytes per chunk the gzip decoder hands the CSV decoder.
const GUNZIP_BUFFER: usize = 256 * 1024;
/// Chunks the gzip decoder may run ahead of the CSV decoder.
const GUNZIP_AHEAD: usize = 4;
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

/// Gunzips `raw` (gzip members one after another) on a task of its own, so that
/// decompression and CSV decoding run on two cores; the bytes come back in order,
/// and an error ends them. The task stops when the reader is dropped.
fn gunzip_ahead(raw: impl AsyncBufRead + Send + Unpin + 'static) -> impl AsyncBufRead + Send {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(GUNZIP_AHEAD);
    tokio::spawn(async move {
        let mut gunzip = GzipDecoder::new(raw);
        gunzip.multiple_members(true);
        loop {
            let mut chunk = bytes::BytesMut::with_capacity(GUNZIP_BUFFER);
            let mut end = false;
            let mut failed = None;
            while chunk.len() < GUNZIP_BUFFER && !end && failed.is_none() {
                match gunzip.read_buf(&mut chunk).await {
                    Ok(n) => end = n == 0,
                    Err(e) => failed = Some(e),
                }
            }
            // the reader sees the bytes before an error, then the error
            let sent = chunk.is_empty() || tx.send(Ok(chunk.freeze())).await.is_ok();
            if let Some(e) = failed {
                let _ = tx.send(Err(e)).await;
                return;
            }
            if !sent || end {
                return;
            }
        }
    });
    StreamReader::new(tokio_stream::wrappers::ReceiverStream::new(rx))
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
        Box::pin(gunzip_ahead(raw))
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

    let mut records = Records::new(file, schema.fields().len(), projection);
    records.feed(&head[bom..], sink)?;
    loop {
        let buf = reader.fill_buf().await.map_err(io_err)?;
        if buf.is_empty() {
            break;
        }
        let n = buf.len();
        records.feed(buf, sink)?;
        reader.as_mut().consume(n);
        super::put_ready(sink).await?;
    }
    // End of input: completes a last record without a line end.
    records.feed(&[], sink)?;
    records.flush(sink)?;
    Ok(fetched.load(Ordering::Relaxed))
}

/// One text column of a batch being built: the values' bytes and their offsets
/// (an empty field is null, as in Arrow's CSV reader).
struct TextColumn {
    values: Vec<u8>,
    offsets: Vec<i32>,
}

impl TextColumn {
    fn new() -> TextColumn {
        TextColumn {
            values: Vec::new(),
            offsets: vec![0],
        }
    }

    fn push(&mut self, field: &[u8]) {
        self.values.extend_from_slice(field);
        self.offsets.push(self.values.len() as i32);
    }

    /// The column as an Arrow array (its bytes were checked to be UTF-8 field by
    /// field); leaves the builder empty, with room for as much again.
    fn finish(&mut self) -> Result<ArrayRef, ArrowError> {
        let (values, offsets) = (self.values.capacity(), self.offsets.capacity());
        let values = std::mem::replace(&mut self.values, Vec::with_capacity(values));
        let offsets = std::mem::replace(&mut self.offsets, Vec::with_capacity(offsets));
        self.offsets.push(0);
        let present: Vec<bool> = offsets.windows(2).map(|w| w[1] > w[0]).collect();
        let nulls = NullBuffer::from(present);
        let nulls = (nulls.null_count() > 0).then_some(nulls);
        let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
        Ok(std::sync::Arc::new(StringArray::try_new(
            offsets,
            values.into(),
            nulls,
        )?))
    }
}

/// Splits the bytes of a CSV object into records (`csv-core`: RFC 4180 quoting,
/// any line end, blank lines skipped) and builds text columns of the planned
/// fields, [`BATCH_ROWS`] rows at a time. The first record is the header.
struct Records<'a> {
    file: &'a str,
    reader: csv_core::Reader,
    /// The header's field count: every row must have as many.
    fields: usize,
    /// The planned fields (sorted input column indices).
    projection: Vec<usize>,
    /// The record being read, which may span several pieces of input: its
    /// unescaped bytes and the end of each field.
    bytes: Vec<u8>,
    bytes_len: usize,
    ends: Vec<usize>,
    ends_len: usize,
    header_read: bool,
    /// Data records read (the header not counted).
    records: u64,
    columns: Vec<TextColumn>,
    rows: usize,
}

impl<'a> Records<'a> {
    fn new(file: &'a str, fields: usize, projection: Vec<usize>) -> Records<'a> {
        Records {
            file,
            reader: csv_core::Reader::new(),
            fields,
            columns: projection.iter().map(|_| TextColumn::new()).collect(),
            projection,
            bytes: vec![0; 4096],
            bytes_len: 0,
            ends: vec![0; fields.max(1) + 1],
            ends_len: 0,
            header_read: false,
            records: 0,
            rows: 0,
        }
    }

    /// Reads the records `input` completes (an empty `input` ends the object),
    /// handing full batches and malformed rows to `sink`.
    fn feed(&mut self, mut input: &[u8], sink: &mut (dyn Sink + Send)) -> Result<(), WorkerError> {
        loop {
            let (result, read, written, ended) = self.reader.read_record(
                input,
                &mut self.bytes[self.bytes_len..],
                &mut self.ends[self.ends_len..],
            );
            input = &input[read..];
            self.bytes_len += written;
            self.ends_len += ended;
            match result {
                ReadRecordResult::InputEmpty | ReadRecordResult::End => return Ok(()),
                ReadRecordResult::OutputFull => {
                    let grown = self.bytes.len() * 2;
                    self.bytes.resize(grown, 0);
                }
                ReadRecordResult::OutputEndsFull => {
                    let grown = self.ends.len() * 2;
                    self.ends.resize(grown, 0);
                }
                ReadRecordResult::Record => {
                    let fields = self.ends_len;
                    self.bytes_len = 0;
                    self.ends_len = 0;
                    if !self.header_read {
                        self.header_read = true;
                        continue;
                    }
                    self.records += 1;
                    self.record(fields, sink)?;
                }
            }
        }
    }

    /// The record just read (`fields` fields): a row of the batch, or a
    /// malformed row for the sink.
    fn record(&mut self, fields: usize, sink: &mut (dyn Sink + Send)) -> Result<(), WorkerError> {
        let line = || self.reader.line();
        if fields != self.fields {
            return self.malformed(
                sink,
                format!(
                    "{fields} fields where the header has {} (record ending on line {}; \
                     an unclosed quote makes one record of the lines after it)",
                    self.fields,
                    line()
                ),
            );
        }
        let field = |ends: &[usize], i: usize| {
            let start = if i == 0 { 0 } else { ends[i - 1] };
            start..ends[i]
        };
        let ends = &self.ends[..fields];
        // An ASCII record (nearly every one) has UTF-8 fields; any other is
        // checked field by field (a field's bytes alone must be text).
        let ascii = self.bytes[..ends.last().copied().unwrap_or(0)].is_ascii();
        if let Some(&bad) = self
            .projection
            .iter()
            .filter(|_| !ascii)
            .find(|&&i| std::str::from_utf8(&self.bytes[field(ends, i)]).is_err())
        {
            return self.malformed(
                sink,
                format!(
                    "field {} (record ending on line {}) is not UTF-8 text",
                    bad + 1,
                    line()
                ),
            );
        }
        for (column, &i) in self.columns.iter_mut().zip(&self.projection) {
            column.push(&self.bytes[field(ends, i)]);
        }
        self.rows += 1;
        if self.rows == BATCH_ROWS {
            self.flush(sink)?;
        }
        Ok(())
    }

    /// Hands the rows before a malformed one to the sink, then the malformed
    /// row: rows reach the sink in the file's order.
    fn malformed(
        &mut self,
        sink: &mut (dyn Sink + Send),
        detail: String,
    ) -> Result<(), WorkerError> {
        self.flush(sink)?;
        sink.malformed(self.records, detail)
    }

    /// Hands the rows built so far to the sink as one batch.
    fn flush(&mut self, sink: &mut (dyn Sink + Send)) -> Result<(), WorkerError> {
        if self.rows == 0 {
            return Ok(());
        }
        let columns = self
            .columns
            .iter_mut()
            .map(TextColumn::finish)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| WorkerError::Arrow {
                file: self.file.to_string(),
                source,
            })?;
        let rows = std::mem::take(&mut self.rows);
        // every record so far is a row the sink has seen, in order
        sink.batch(&columns, rows, &|index| index + 1)
    }
}

// ---------------------------------------------------------------------------
// Parquet
