//! CSV splits: one object (optionally gzip, several members allowed), streamed
//! through the decoder in batches; every column is read as text.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::csv::reader::Decoder;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use async_compression::tokio::bufread::GzipDecoder;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use shoal_proto::{Location, StoreError, pb};
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
        super::put_ready(sink).await?;
    }
    // End of input: completes a last record without a line end.
    feed(&mut decoder, sink, &[])?;
    flush(&mut decoder, sink)?;
    Ok(fetched.load(Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// Parquet
