//! `segments.previous` on a worker: where its customers were in an earlier run.
//! The earlier assignments are read (only this worker's shards' parts when the
//! earlier run had the same shards, every part otherwise), each customer found in
//! its shard, and per shard the customers and feature sums of every earlier
//! segment, the moves from earlier segments to this job's nearest centroids and
//! the customers new in this run are counted.

use std::collections::{BTreeMap, BTreeSet};

use arrow::array::{Array, AsArray};
use arrow::datatypes::UInt32Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use shoal_kernels::{Backend, Nearest};
use shoal_proto::pb;
use shoal_spec::hash::{id_key, shard_of_key};
use shoal_store::Location;

use crate::WorkerError;
use crate::job::{JobState, resident, stop_if_cancelled};

/// Per owned shard: (row, earlier segment id) of its customers the earlier run had.
pub type Earlier = BTreeMap<u32, Vec<(u32, u32)>>;

/// The earlier parts this worker reads: its shards' when the earlier run had
/// `shards` shards like this job, else all.
fn parts_to_read<'a>(
    parts: &'a [String],
    owned: &[u32],
    same_shards: bool,
) -> impl Iterator<Item = &'a String> {
    let mine: BTreeSet<String> = owned
        .iter()
        .map(|s| format!("assignments.parquet/part-{s:05}.parquet"))
        .collect();
    parts
        .iter()
        .filter(move |p| !same_shards || mine.contains(p.as_str()))
}

/// Reads the earlier assignments of the customers of `owned` (user ids and
/// keys as `ids_of` finds them: shard, row).
pub async fn read_earlier(
    folder: &Location,
    req: &pb::PreviousRequest,
    (owned, job_shards): (&[u32], u32),
    find: impl Fn(u32, u64, &str) -> Option<u32>,
) -> Result<Earlier, WorkerError> {
    let owned_set: BTreeSet<u32> = owned.iter().copied().collect();
    let mut out: Earlier = owned.iter().map(|&s| (s, Vec::new())).collect();
    for part in parts_to_read(&req.parts, owned, req.shards == job_shards) {
        let url = folder.child(part);
        let bytes = url.get().await?;
        let bad = |e: String| WorkerError::InvalidRequest(format!("{}: {e}", url.url()));
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
        for batch in reader {
            let batch = batch.map_err(|e| bad(e.to_string()))?;
            let users = batch
                .column_by_name("user_id")
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or_else(|| bad("no user_id column of text".into()))?;
            let segments = batch
                .column_by_name("segment")
                .and_then(|c| c.as_primitive_opt::<UInt32Type>())
                .ok_or_else(|| bad("no segment column of uint32".into()))?;
            for i in 0..batch.num_rows() {
                if users.is_null(i) || segments.is_null(i) {
                    continue;
                }
                let id = users.value(i);
                let key = id_key(id);
                let shard = shard_of_key(key, job_shards);
                if !owned_set.contains(&shard) {
                    continue;
                }
                if let Some(row) = find(shard, key, id) {
                    out.get_mut(&shard)
                        .expect("owned")
                        .push((row, segments.value(i)));
                }
            }
        }
    }
    Ok(out)
}

/// The per-shard figures of the earlier run's customers against this job's
/// centroids (`req`).
pub fn overlap(
    job: &JobState,
    job_id: &str,
    req: &pb::PreviousRequest,
    earlier: &Earlier,
    backend: &dyn Backend,
) -> Result<Vec<pb::PreviousShard>, WorkerError> {
    job.check_dims(req.dims as usize, "centroids")?;
    let (d, k) = (job.dims, req.k as usize);
    if req.centroids.len() != k * d || k == 0 {
        return Err(WorkerError::InvalidRequest(format!(
            "{} centroid values for k = {k} and {d} dimensions",
            req.centroids.len()
        )));
    }
    let position: BTreeMap<u32, usize> = req
        .previous_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, i))
        .collect();
    let old = req.previous_ids.len();
    let mut out = Vec::new();
    for (&id, shard) in &job.shards {
        stop_if_cancelled(&job.cancel, job_id)?;
        let mut figures = pb::PreviousShard {
            shard: id,
            counts: vec![0; old],
            sums: vec![0.0; old * d],
            moves: vec![0; old * k],
            new_users: vec![0; k],
        };
        if shard.is_empty() {
            out.push(figures);
            continue;
        }
        let points = resident(&shard.points, job_id, id)?;
        let mut nearest = vec![Nearest::default(); shard.len()];
        backend.assign(points, &req.centroids, k, &mut nearest)?;
        let mut was: Vec<Option<usize>> = vec![None; shard.len()];
        for &(row, segment) in earlier.get(&id).map_or(&[][..], Vec::as_slice) {
            // a segment the earlier report does not list counts as not there
            was[row as usize] = position.get(&segment).copied();
        }
        let rows: Vec<u32> = (0..shard.len() as u32).collect();
        let values = backend.download_rows(points, &rows)?;
        for (row, n) in nearest.iter().enumerate() {
            let c = n.best as usize;
            match was[row] {
                None => figures.new_users[c] += 1,
                Some(o) => {
                    figures.counts[o] += 1;
                    figures.moves[o * k + c] += 1;
                    for (s, &v) in figures.sums[o * d..(o + 1) * d]
                        .iter_mut()
                        .zip(&values[row * d..(row + 1) * d])
                    {
                        *s += f64::from(v);
                    }
                }
            }
        }
        out.push(figures);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_own_parts_are_read_when_the_shards_agree() {
        let parts: Vec<String> = (0..4)
            .map(|s| format!("assignments.parquet/part-{s:05}.parquet"))
            .collect();
        let mine: Vec<&String> = parts_to_read(&parts, &[1, 3], true).collect();
        assert_eq!(mine, vec![&parts[1], &parts[3]]);
        assert_eq!(parts_to_read(&parts, &[1, 3], false).count(), 4);
    }
}
