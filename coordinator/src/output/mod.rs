//! Job-level outputs the coordinator writes: `segments.parquet`,
//! `centroids.parquet`, `segment_items.parquet` (with ALS), `report.json`, and last
//! of all the `_SUCCESS` manifest.

use crate::CoordinatorError;
use arrow::array::{
    Array, ArrayRef, Float32Builder, Float64Array, ListBuilder, StringArray, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use serde::Serialize;
use shoal_proto::pb;
use shoal_spec::manifest::{FileEntry, InputEntry, MANIFEST, MANIFEST_VERSION, Manifest};
use shoal_store::{self as store, InputObject, Location};
use std::sync::Arc;
use std::time::Instant;

mod page;
mod report;
mod summary;

pub use report::*;
pub use summary::*;

/// Files a job writes at the top of its output folder (besides the manifest).
const JOB_FILES: [&str; 5] = [
    "segments.parquet",
    "centroids.parquet",
    "report.json",
    "report.html",
    "segment_items.parquet",
];
/// Tables written as a folder of per-shard parts.
const PART_TABLES: [&str; 4] = [
    ASSIGNMENTS,
    "user_factors.parquet",
    "item_factors.parquet",
    "recommendations.parquet",
];
const ASSIGNMENTS: &str = "assignments.parquet";

/// Removes the manifest first, then the outputs of an earlier run, so the folder
/// never looks complete while a job writes into it. Other objects are left alone.
pub async fn clear_previous(output: &Location) -> Result<(), CoordinatorError> {
    output.child(MANIFEST).delete().await?;
    for f in JOB_FILES {
        output.child(f).delete().await?;
    }
    for t in PART_TABLES {
        output.child(t).delete_all().await?;
    }
    Ok(())
}

pub use crate::rows::RowTally;

/// Fails when the splits read one customer's id in two forms: some hold the user
/// column as numbers (ids read as integers, `17850`) while text ids of others
/// are integers written with a fraction (`17850.0`, which stays that text while
/// `input.user_as_integer` is false). Names the files of each form.
pub fn check_id_forms(
    results: &[pb::SplitResult],
    splits: &[pb::Split],
) -> Result<(), CoordinatorError> {
    let object = |r: &pb::SplitResult| {
        splits
            .iter()
            .find(|s| s.index == r.split)
            .map_or_else(|| format!("split {}", r.split), |s| s.object.clone())
    };
    let files = |pick: &dyn Fn(&pb::SplitResult) -> bool| {
        let mut names: Vec<String> = results.iter().filter(|r| pick(r)).map(object).collect();
        names.dedup();
        let more = names.len().saturating_sub(3);
        names.truncate(3);
        let mut text = names.join(", ");
        if more > 0 {
            text.push_str(&format!(" and {more} more"));
        }
        text
    };
    let fractional: u64 = results.iter().map(|r| r.fractional_integer_ids).sum();
    if fractional == 0 || !results.iter().any(|r| r.numeric_user_ids) {
        return Ok(());
    }
    Err(CoordinatorError::MixedIdForms {
        numeric: files(&|r| r.numeric_user_ids),
        fractional,
        text: files(&|r| r.fractional_integer_ids > 0),
        example: results
            .iter()
            .find(|r| r.fractional_integer_ids > 0)
            .map(|r| r.fractional_integer_example.clone())
            .unwrap_or_default(),
    })
}

/// Seconds spent per phase, in order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseTimes(pub Vec<(String, f64)>);

impl PhaseTimes {
    pub fn add(&mut self, phase: &str, since: Instant) {
        self.0
            .push((phase.to_string(), since.elapsed().as_secs_f64()));
    }
}

/// Copies the model's `item_factors.parquet/` parts into `output`, returning them
/// as written files (for the manifest).
pub async fn copy_item_factors(
    model: &crate::model::Model,
    output: &Location,
) -> Result<Vec<pb::WrittenFile>, CoordinatorError> {
    let mut out = Vec::new();
    for f in &model.manifest.files {
        if !f.path.starts_with("item_factors.parquet/") {
            continue;
        }
        let bytes = model.folder.child(&f.path).get().await?;
        let len = bytes.len() as u64;
        output.child(&f.path).put(bytes).await?;
        out.push(pb::WrittenFile {
            path: f.path.clone(),
            rows: f.rows,
            bytes: len,
        });
    }
    Ok(out)
}

/// The job the outputs are of.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    pub id: &'a shoal_spec::JobId,
    pub spec: &'a shoal_spec::JobSpec,
}

/// Milliseconds since the epoch as RFC 3339 (UTC, millisecond precision).
pub(crate) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// `segment_items.parquet`: every segment's top items, one row per (segment, rank).
fn segment_items_batch(
    segments: &[SegmentSummary],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let rows: Vec<(u32, u32, &TopItem)> = segments
        .iter()
        .flat_map(|s| {
            s.top_items
                .iter()
                .enumerate()
                .map(move |(r, t)| (s.segment, r as u32 + 1, t))
        })
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("segment", DataType::UInt32, false),
        Field::new("rank", DataType::UInt32, false),
        Field::new("item_id", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("users", DataType::UInt64, false),
        Field::new("share", DataType::Float64, false),
        Field::new("lift", DataType::Float64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.2.item_id.as_str()),
        )),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.2.label.as_deref()),
        )),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.2.users),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.2.share),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.2.lift),
        )),
    ];
    RecordBatch::try_new(schema, columns)
}

fn segments_batch(segments: &[SegmentSummary]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let f64col = |f: fn(&SegmentSummary) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(segments.iter().map(f)))
    };
    let opt64 = |f: fn(&SegmentSummary) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from_iter(segments.iter().map(f)))
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("segment", DataType::UInt32, false),
        // the RFM map's name of most of its customers, and their share (null:
        // customers are not named)
        Field::new("name", DataType::Utf8, true),
        Field::new("name_share", DataType::Float64, true),
        Field::new("size", DataType::UInt64, false),
        Field::new("share", DataType::Float64, false),
        Field::new("revenue", DataType::Float64, false),
        Field::new("revenue_share", DataType::Float64, false),
        Field::new("recency_days_mean", DataType::Float64, false),
        Field::new("recency_days_median", DataType::Float64, false),
        Field::new("frequency_mean", DataType::Float64, false),
        Field::new("frequency_median", DataType::Float64, false),
        Field::new("monetary_mean", DataType::Float64, false),
        Field::new("monetary_median", DataType::Float64, false),
        Field::new("r_score_mean", DataType::Float64, true),
        Field::new("f_score_mean", DataType::Float64, true),
        Field::new("m_score_mean", DataType::Float64, true),
        // null without an RFM block
        Field::new("centroid_recency_days", DataType::Float64, true),
        Field::new("centroid_frequency", DataType::Float64, true),
        Field::new("centroid_monetary", DataType::Float64, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from_iter_values(
                segments.iter().map(|s| s.segment),
            )),
            Arc::new(StringArray::from_iter(
                segments.iter().map(|s| s.name.as_deref()),
            )),
            opt64(|s| s.name_share),
            Arc::new(UInt64Array::from_iter_values(
                segments.iter().map(|s| s.size),
            )),
            f64col(|s| s.share),
            f64col(|s| s.revenue),
            f64col(|s| s.revenue_share),
            f64col(|s| s.recency_days_mean),
            f64col(|s| s.recency_days_median),
            f64col(|s| s.frequency_mean),
            f64col(|s| s.frequency_median),
            f64col(|s| s.monetary_mean),
            f64col(|s| s.monetary_median),
            opt64(|s| s.r_score_mean),
            opt64(|s| s.f_score_mean),
            opt64(|s| s.m_score_mean),
            opt64(|s| s.centroid_recency_days),
            opt64(|s| s.centroid_frequency),
            opt64(|s| s.centroid_monetary),
        ],
    )
}

fn centroids_batch(
    centroids: &[f32],
    dims: usize,
    (ids, sizes): (&[u32], &[u64]),
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let mut list = ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new(
        "item",
        DataType::Float32,
        false,
    )));
    for c in centroids.chunks_exact(dims) {
        list.values().append_slice(c);
        list.append(true);
    }
    let list = list.finish();
    let schema = Arc::new(Schema::new(vec![
        Field::new("segment", DataType::UInt32, false),
        Field::new("size", DataType::UInt64, false),
        Field::new("centroid", list.data_type().clone(), false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from_iter_values(ids.iter().copied())),
            Arc::new(UInt64Array::from_iter_values(sizes.iter().copied())),
            Arc::new(list),
        ],
    )
}

fn write_err(file: &str, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Write {
        file: file.to_string(),
        reason: e.to_string(),
    }
}

async fn put_parquet(
    output: &Location,
    name: &str,
    batch: RecordBatch,
) -> Result<FileEntry, CoordinatorError> {
    let rows = batch.num_rows() as u64;
    let bytes = store::encode_parquet(batch.schema(), &[batch]).map_err(|e| write_err(name, e))?;
    let len = bytes.len() as u64;
    output.child(name).put(bytes.into()).await?;
    Ok(FileEntry {
        path: name.to_string(),
        rows,
        bytes: len,
    })
}

/// Checks (HEAD) that every file the manifest will list is in the store with the
/// size recorded for it.
async fn check_listed(output: &Location, files: &[FileEntry]) -> Result<(), CoordinatorError> {
    for f in files {
        match output.child(&f.path).head().await? {
            Some(m) if m.size == f.bytes => {}
            other => {
                return Err(write_err(
                    &output.child(&f.path).url(),
                    format!(
                        "{} bytes were written, the store has {}; the output is incomplete and has no {MANIFEST}",
                        f.bytes,
                        other.map_or("no such object".to_string(), |m| format!(
                            "{} bytes",
                            m.size
                        ))
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Writes the job-level files, checks (HEAD) that every file to be listed, the
/// workers' and its own, exists with its size, and writes the manifest last.
#[allow(clippy::too_many_arguments)]
pub async fn write_all(
    ctx: Job<'_>,
    output: &Location,
    inputs: &[InputObject],
    finals: &[pb::ShardFinal],
    item_files: &[pb::WrittenFile],
    summary: &Summary,
    centroids: &[f32],
    dims: usize,
    report: Report,
) -> Result<(), CoordinatorError> {
    let mut files: Vec<FileEntry> = finals
        .iter()
        .flat_map(|f| f.file.iter().chain(&f.files))
        .chain(item_files)
        .map(|w| FileEntry {
            path: w.path.clone(),
            rows: w.rows,
            bytes: w.bytes,
        })
        .collect();
    let sizes: Vec<u64> = summary.segments.iter().map(|s| s.size).collect();
    let ids: Vec<u32> = summary.segments.iter().map(|s| s.segment).collect();
    files.push(
        put_parquet(
            output,
            "segments.parquet",
            segments_batch(&summary.segments).map_err(|e| write_err("segments.parquet", e))?,
        )
        .await?,
    );
    if ctx.spec.features.als {
        files.push(
            put_parquet(
                output,
                "segment_items.parquet",
                segment_items_batch(&summary.segments)
                    .map_err(|e| write_err("segment_items.parquet", e))?,
            )
            .await?,
        );
    }
    files.push(
        put_parquet(
            output,
            "centroids.parquet",
            centroids_batch(centroids, dims, (&ids, &sizes))
                .map_err(|e| write_err("centroids.parquet", e))?,
        )
        .await?,
    );
    let html = shoal_report::render(&page::page(&report, summary));
    let json = serde_json::to_vec_pretty(&report).map_err(|e| write_err("report.json", e))?;
    for (path, bytes) in [("report.json", json), ("report.html", html.into_bytes())] {
        let len = bytes.len() as u64;
        output.child(path).put(bytes.into()).await?;
        files.push(FileEntry {
            path: path.into(),
            rows: 1,
            bytes: len,
        });
    }
    let input: Vec<InputEntry> = inputs
        .iter()
        .map(|i| InputEntry {
            url: i.url.clone(),
            size: i.size,
            e_tag: i.e_tag.clone(),
            last_modified_unix_ms: i.last_modified_ms,
        })
        .collect();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        job_id: ctx.id.to_string(),
        name: ctx.spec.name.clone(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        shoal_version: env!("CARGO_PKG_VERSION").to_string(),
        spec: ctx.spec.clone(),
        input_fingerprint: Manifest::fingerprint(&input),
        input,
        files,
    };
    check_listed(output, &manifest.files).await?;
    output
        .child(MANIFEST)
        .put(manifest.to_json().into_bytes().into())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        // 2011-12-09 12:50:00 UTC, the last event of the Online Retail log
        assert_eq!(rfc3339(1_323_435_000_000), "2011-12-09T12:50:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
    }

    #[test]
    fn an_id_read_as_a_number_and_as_text_with_a_fraction_is_refused() {
        let split = |index: u32, object: &str| pb::Split {
            index,
            object: object.into(),
            ..Default::default()
        };
        let splits = [split(0, "a.parquet"), split(1, "b.csv"), split(2, "c.csv")];
        let numeric = pb::SplitResult {
            split: 0,
            numeric_user_ids: true,
            ..Default::default()
        };
        let text = |split, n: u64| pb::SplitResult {
            split,
            fractional_integer_ids: n,
            fractional_integer_example: if n > 0 {
                "17850.0".into()
            } else {
                String::new()
            },
            ..Default::default()
        };
        // Either form alone is one customer per id.
        check_id_forms(&[numeric.clone(), text(1, 0)], &splits).unwrap();
        check_id_forms(&[text(1, 3), text(2, 1)], &splits).unwrap();
        let err = check_id_forms(&[numeric, text(1, 3), text(2, 1)], &splits)
            .unwrap_err()
            .to_string();
        for part in [
            "a.parquet",
            "b.csv, c.csv",
            "4 user ids",
            "`17850.0`",
            "user_as_integer",
        ] {
            assert!(err.contains(part), "{part}: {err}");
        }
    }
}
