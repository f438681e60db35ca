//! Plan: the output folder checked and cleared, the model read (fold-in), the
//! input objects listed and cut into splits, the extra table and the
//! recommendation list found. No worker is needed yet.

use crate::CoordinatorError;
use crate::job::JobContext;
use crate::model::Model;
use crate::output;
use crate::previous::Previous;
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use shoal_proto::pb;
use shoal_spec::spec::Format;
use shoal_store::{self as store, InputObject, Location};
use tracing::info;

/// Parquet row groups are grouped into splits of about this many bytes.
const SPLIT_BYTES: u64 = 64 * 1024 * 1024;

/// What the plan found.
pub struct Planned {
    pub output: Location,
    pub model: Option<Model>,
    pub staging: Location,
    pub inputs: Vec<InputObject>,
    pub splits: Vec<pb::Split>,
    pub extra_splits: Vec<pb::Split>,
    /// segments.previous: the earlier run whose segment ids this one keeps.
    pub previous: Option<Previous>,
}

pub async fn run(ctx: &JobContext) -> Result<Planned, CoordinatorError> {
    let spec = &ctx.spec;
    let output = store::resolve(&spec.output.path)?;
    // Checked before the output folder is touched (it must not be the model's).
    let model = match &spec.model {
        Some(m) => Some(Model::load(&m.path, spec, &output).await?),
        None => None,
    };
    if output.head().await?.is_some() {
        return Err(CoordinatorError::OutputIsFile { url: output.url() });
    }
    // Read before the output folder is cleared (it must not be this job's).
    let previous = match spec.segments.previous.as_str() {
        "" => None,
        url => {
            let p = Previous::load(url).await?;
            let (a, b) = (
                p.folder.url().trim_end_matches('/').to_string(),
                output.url().trim_end_matches('/').to_string(),
            );
            if a == b {
                return Err(CoordinatorError::Previous {
                    url: a,
                    reason: "it is this job's output.path, which the job clears before it writes: write each run to a folder of its own".into(),
                });
            }
            Some(p)
        }
    };
    // The folder must not look complete while this job writes into it.
    output::clear_previous(&output).await?;
    let staging = store::resolve(&spec.staging_for(&ctx.id))?;
    let inputs = store::list_inputs(&spec.input.interactions).await?;
    let splits = plan_splits(spec.input.format, &inputs).await?;
    let extra_inputs = match spec.features.extra() {
        Some(pattern) => {
            let found = match store::list_inputs(pattern).await {
                Err(shoal_store::StoreError::NoInputs { .. }) => Vec::new(),
                other => other?,
            };
            if found.is_empty() {
                return Err(CoordinatorError::ExtraTable {
                    reason: format!(
                        "no object matches `{pattern}` (looked for a file, a folder and a glob)"
                    ),
                });
            }
            found
        }
        None => Vec::new(),
    };
    let extra_splits = plan_splits(None, &extra_inputs).await?;
    if let Some(pattern) = spec.recommend.users() {
        // checked here, before any work, though the workers read it at finalize
        match store::list_inputs(pattern).await {
            Err(shoal_store::StoreError::NoInputs { .. }) => {
                return Err(CoordinatorError::Spec(shoal_spec::SpecError::Invalid {
                    field: "recommend.users",
                    message: format!(
                        "nothing matches `{pattern}` (a file, folder or glob of .txt lists or CSV / Parquet tables of ids)"
                    ),
                }));
            }
            other => {
                other?;
            }
        }
    }
    info!(
        objects = inputs.len(),
        splits = splits.len(),
        extra_splits = extra_splits.len(),
        "planned"
    );
    Ok(Planned {
        output,
        model,
        staging,
        inputs,
        splits,
        extra_splits,
        previous,
    })
}

/// Cuts the input objects into splits: one per CSV object (a gzip stream cannot be
/// split), Parquet row groups grouped into splits of about [`SPLIT_BYTES`].
/// Splits of the objects `inputs`, read as `format` (else as their names say).
async fn plan_splits(
    format: Option<Format>,
    inputs: &[InputObject],
) -> Result<Vec<pb::Split>, CoordinatorError> {
    let mut splits = Vec::new();
    for obj in inputs {
        let named = Format::from_name(&obj.url);
        let (format, gzip) = match (format, named) {
            (Some(f), Some((nf, gz))) if f == nf => (f, gz),
            (Some(f), _) => (f, obj.url.to_ascii_lowercase().ends_with(".gz")),
            (None, Some(x)) => x,
            (None, None) => {
                return Err(CoordinatorError::UnknownFormat {
                    object: obj.url.clone(),
                });
            }
        };
        match format {
            Format::Csv => splits.push(pb::Split {
                index: splits.len() as u32,
                object: obj.url.clone(),
                size: obj.size,
                format: "csv".into(),
                row_groups: Vec::new(),
                gzip,
            }),
            Format::Parquet => {
                let loc = store::resolve(&obj.url)?;
                let builder = ParquetRecordBatchStreamBuilder::new(store::ParquetSource::new(&loc))
                    .await
                    .map_err(|source| CoordinatorError::ParquetFooter {
                        object: obj.url.clone(),
                        source,
                    })?;
                let mut group: Vec<u32> = Vec::new();
                let mut bytes = 0u64;
                let groups = builder.metadata().row_groups();
                for (i, rg) in groups.iter().enumerate() {
                    group.push(i as u32);
                    bytes += rg.compressed_size().max(0) as u64;
                    if bytes >= SPLIT_BYTES || i + 1 == groups.len() {
                        splits.push(pb::Split {
                            index: splits.len() as u32,
                            object: obj.url.clone(),
                            size: bytes,
                            format: "parquet".into(),
                            row_groups: std::mem::take(&mut group),
                            gzip: false,
                        });
                        bytes = 0;
                    }
                }
            }
        }
    }
    Ok(splits)
}
