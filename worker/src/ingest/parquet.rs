//! Parquet splits: some row groups of one object, read with a projection of the
//! columns the job uses; bad rows are numbered by their row in the file.

use std::sync::atomic::Ordering;

use arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use parquet::errors::ParquetError;
use shoal_proto::pb;
use shoal_store::ParquetSource;
use shoal_store::{Location, StoreError};

use super::{BATCH_ROWS, IngestControl, Sink};
use crate::error::WorkerError;
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
        super::put_ready(sink).await?;
    }
    count_bytes(sink.control());
    Ok(fetched.load(Ordering::Relaxed))
}
