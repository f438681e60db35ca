//! The catalogue of a job's items: every item shard's ids and final factors
//! fetched from their owners (for recommendations and the held-out evaluation),
//! or a fold-in model's item table read from its output folder.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, AsArray, StringBuilder};
use shoal_store as store;

use crate::WorkerError;
use crate::flight::Peers;
use crate::steps::als::Side;
use crate::steps::als_job::Catalog;

/// Every item shard's keys, ids and factors (version `version`), from `owners`
/// (the owner of each item shard, in shard order).
pub async fn fetch(
    peers: &Peers,
    job: &str,
    owners: &[String],
    version: u32,
    f: usize,
) -> Result<Catalog, WorkerError> {
    let parts = futures::future::try_join_all(owners.iter().enumerate().map(|(shard, owner)| {
        let shard = shard as u32;
        async move {
            let keys = peers.fetch_keys(owner, job, Side::Items, shard).await?;
            let ids = peers.fetch_ids(owner, job, Side::Items, shard).await?;
            let values = peers
                .fetch_rows(owner, job, (Side::Items, shard), version, Vec::new())
                .await?;
            Ok::<_, WorkerError>((shard, keys, ids, values))
        }
    }))
    .await?;
    Catalog::new(job, f, parts)
}

/// Every item of a model's item factor `parts` (paths in its folder, as its
/// manifest lists them): each row checked to have `f` values, each id once.
pub async fn read_model(
    model: &store::Location,
    parts: &[String],
    f: usize,
) -> Result<Catalog, WorkerError> {
    if parts.is_empty() {
        return Err(WorkerError::InvalidRequest(format!(
            "the manifest of {} lists no item_factors.parquet parts; is it the output folder of a job with features.als = true?",
            model.url()
        )));
    }
    let mut ids = StringBuilder::new();
    let mut factors = Vec::new();
    let mut seen = HashSet::new();
    for part in parts {
        let at = model.child(part);
        let file = at.url();
        let bytes = at.get().await?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|source| WorkerError::Parquet {
                file: file.clone(),
                source,
            })?;
        for batch in reader {
            let batch = batch.map_err(|source| WorkerError::Arrow {
                file: file.clone(),
                source,
            })?;
            let (Some(id), Some(list)) = (
                batch
                    .column_by_name("item_id")
                    .and_then(|c| c.as_string_opt::<i32>()),
                batch
                    .column_by_name("factors")
                    .and_then(|c| c.as_list_opt::<i32>()),
            ) else {
                return Err(WorkerError::InvalidRequest(format!(
                    "{file}: not an item factors table (needs columns item_id: string, factors: list<float>)"
                )));
            };
            for r in 0..batch.num_rows() {
                let row = list.value(r);
                let values = row
                    .as_primitive_opt::<arrow::datatypes::Float32Type>()
                    .filter(|v| v.len() == f)
                    .ok_or_else(|| {
                        WorkerError::InvalidRequest(format!(
                            "{file}, row {r}: item `{}` has {} factors; the spec's als.factors is {f}",
                            id.value(r),
                            row.len()
                        ))
                    })?;
                if !seen.insert(shoal_spec::hash::id_key(id.value(r))) {
                    return Err(WorkerError::InvalidRequest(format!(
                        "{file}, row {r}: item `{}` appears twice in the model's item factors",
                        id.value(r)
                    )));
                }
                ids.append_value(id.value(r));
                factors.extend_from_slice(values.values());
            }
        }
    }
    Ok(Catalog::from_table(ids.finish(), factors))
}

/// The catalogue a job's finalize needs, if any: the model's (a fold-in), or
/// the job's items when it recommends or evaluates.
pub enum Source {
    /// Not needed: the job neither recommends nor evaluates.
    None,
    /// A fold-in's model, read at load.
    Model(Arc<Catalog>),
    /// The item shards' owners, the final version, and the factor count.
    Shards(Vec<String>, u32, usize),
}
