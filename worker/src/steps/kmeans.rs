//! The k-means steps on a worker's shards: scaling the features and uploading
//! them (Standardize), the k-means|| rounds (costs, samples, points by
//! reference), and the Lloyd rounds.

use crate::WorkerError;
use crate::extra;
use crate::job::{JobState, resident, stop_if_cancelled};
use crate::steps::load::{DIMS, moments};
use shoal_kernels::{Backend, Nearest};
use shoal_proto::hash;
use shoal_proto::pb::{self, PointRef};

/// How many rows of `dims` values `values` holds (the job checks `dims` itself).
pub fn check_dims(dims: u32, values: usize, what: &str) -> Result<usize, WorkerError> {
    let d = dims as usize;
    if d == 0 {
        return Err(WorkerError::InvalidRequest(format!("{what}: 0 dimensions")));
    }
    if !values.is_multiple_of(d) {
        return Err(WorkerError::InvalidRequest(format!(
            "{what}: {values} values is not a multiple of {d}"
        )));
    }
    Ok(values / d)
}

/// Scales every shard's features with the global moments and makes them
/// resident: [ALS factors (L2-normalised, × als_weight) | RFM | extra]. Returns
/// each shard's moments of the final features, and their count.
pub fn standardize(
    job: &mut JobState,
    job_id: &str,
    req: &pb::StandardizeRequest,
    backend: &dyn Backend,
) -> Result<(Vec<pb::ShardStats>, usize), WorkerError> {
    if req.mean.len() != DIMS || req.scale.len() != DIMS {
        return Err(WorkerError::InvalidRequest(format!(
            "scaling needs {DIMS} means and scales"
        )));
    }
    let f = job.als.as_ref().map_or(0, |a| a.f);
    let e = extra::dims(&job.extra_columns);
    if req.extra_mean.len() != e || req.extra_scale.len() != e {
        return Err(WorkerError::InvalidRequest(format!(
            "scaling of the features.extra block needs {e} means and scales, got {} and {}",
            req.extra_mean.len(),
            req.extra_scale.len()
        )));
    }
    let dims = f + DIMS + e;
    let mut stats = Vec::new();
    for (&id, shard) in job.shards.iter_mut() {
        stop_if_cancelled(&job.cancel, job_id)?;
        let factors = match &job.als {
            Some(a) => a.user_features(job_id, id, job.als_weight, backend)?,
            None => Vec::new(),
        };
        let n = shard.len();
        let mut features = Vec::with_capacity(n * dims);
        for u in 0..n {
            features.extend_from_slice(&factors[u * f..(u + 1) * f]);
            let row = shard.rfm.log_features(u);
            features.extend(
                row.iter()
                    .enumerate()
                    .map(|(j, x)| ((x - req.mean[j]) / req.scale[j]) as f32),
            );
            features.extend(extra::scaled(
                &shard.extra[u * e..(u + 1) * e],
                &req.extra_mean,
                &req.extra_scale,
                job.extra_weight,
            ));
        }
        drop(factors);
        let as_f64: Vec<f64> = features.iter().map(|&v| f64::from(v)).collect();
        shard.sum_sq = as_f64.iter().map(|v| v * v).sum();
        stats.push(pb::ShardStats {
            shard: id,
            users: n as u64,
            moments: moments(&as_f64, dims),
            ..Default::default()
        });
        drop(as_f64);
        shard.points = Some(backend.upload(&features, dims)?);
        shard.costs = vec![f32::INFINITY; n];
        shard.nearest = vec![Nearest::default(); n];
        shard.bounds = None;
        shard.labels = Vec::new();
    }
    job.dims = dims;
    job.extra_scaling = (req.extra_mean.clone(), req.extra_scale.clone());
    Ok((stats, dims))
}

/// The points `req` names (k-means|| seeds), row-major.
pub fn get_points(
    job: &JobState,
    job_id: &str,
    req: &pb::GetPointsRequest,
    backend: &dyn Backend,
) -> Result<Vec<f32>, WorkerError> {
    let mut values = Vec::with_capacity(req.points.len() * job.dims);
    for p in &req.points {
        let shard = job.shards.get(&p.shard).ok_or(WorkerError::UnknownShard {
            job: job_id.to_string(),
            shard: p.shard,
        })?;
        let row = u32::try_from(p.index).map_err(|_| {
            WorkerError::InvalidRequest(format!("point index {} out of range", p.index))
        })?;
        values.extend(backend.download_rows(shard.points(job_id, p.shard)?, &[row])?);
    }
    Ok(values)
}

/// k-means||: folds `new_centers` into every point's cost; each shard's cost sum.
pub fn init_costs(
    job: &mut JobState,
    job_id: &str,
    req: &pb::InitCostsRequest,
    k: usize,
    backend: &dyn Backend,
) -> Result<Vec<pb::ShardCost>, WorkerError> {
    job.check_dims(req.dims as usize, "new centers")?;
    let mut out = Vec::new();
    for (&id, shard) in job.shards.iter_mut() {
        stop_if_cancelled(&job.cancel, job_id)?;
        if k > 0 && !shard.is_empty() {
            let points = resident(&shard.points, job_id, id)?;
            backend.assign(points, &req.new_centers, k, &mut shard.nearest)?;
            for (c, n) in shard.costs.iter_mut().zip(&shard.nearest) {
                *c = c.min(n.best_dist);
            }
        }
        let cost: f64 = shard.costs.iter().map(|c| f64::from(*c)).sum();
        out.push(pb::ShardCost { shard: id, cost });
    }
    Ok(out)
}

/// k-means||: every point with probability min(1, l · cost / total cost), drawn
/// by a seeded hash of (round, shard, row).
pub fn init_sample(
    job: &JobState,
    job_id: &str,
    req: &pb::InitSampleRequest,
    backend: &dyn Backend,
) -> Result<Vec<pb::SampledPoint>, WorkerError> {
    if !(req.total_cost.is_finite() && req.total_cost >= 0.0 && req.oversampling > 0.0) {
        return Err(WorkerError::InvalidRequest(
            "sampling needs a finite total cost and positive oversampling".into(),
        ));
    }
    let mut out = Vec::new();
    if req.total_cost == 0.0 {
        return Ok(out);
    }
    for (&id, shard) in job.shards.iter() {
        stop_if_cancelled(&job.cancel, job_id)?;
        let mut rows = Vec::new();
        for (i, cost) in shard.costs.iter().enumerate() {
            let p = (req.oversampling * f64::from(*cost) / req.total_cost).min(1.0);
            let u = hash::unit(hash::key(
                req.seed,
                &[u64::from(req.round), u64::from(id), i as u64],
            ));
            if u < p {
                rows.push(i as u32);
            }
        }
        if rows.is_empty() {
            continue;
        }
        let values = backend.download_rows(shard.points(job_id, id)?, &rows)?;
        for (row, v) in rows.iter().zip(values.chunks_exact(job.dims)) {
            out.push(pb::SampledPoint {
                point: Some(PointRef {
                    shard: id,
                    index: u64::from(*row),
                }),
                values: v.to_vec(),
            });
        }
    }
    Ok(out)
}

/// One Lloyd round on every shard: each point's nearest centroid, the sums,
/// counts and inertia per shard, and the `far` farthest points of each shard
/// (candidates to re-seed empty clusters).
pub fn lloyd(
    job: &mut JobState,
    job_id: &str,
    req: &pb::LloydStepRequest,
    k: usize,
    backend: &dyn Backend,
) -> Result<Vec<pb::ShardPartial>, WorkerError> {
    job.check_dims(req.dims as usize, "centroids")?;
    let d = job.dims;
    let mut out = Vec::new();
    for (&id, shard) in job.shards.iter_mut() {
        stop_if_cancelled(&job.cancel, job_id)?;
        if shard.is_empty() {
            out.push(pb::ShardPartial {
                shard: id,
                sums: vec![0.0; k * d],
                counts: vec![0; k],
                inertia: 0.0,
                far: Vec::new(),
            });
            continue;
        }
        let points = resident(&shard.points, job_id, id)?;
        backend.assign(points, &req.centroids, k, &mut shard.nearest)?;
        let labels: Vec<u32> = shard.nearest.iter().map(|n| n.best).collect();
        let partial = backend.partial_sums(points, &labels, k)?;
        let inertia: f64 = shard.nearest.iter().map(|n| f64::from(n.best_dist)).sum();
        let far_rows = farthest(&shard.nearest, req.far_points as usize);
        let values = backend.download_rows(points, &far_rows)?;
        let far = far_rows
            .iter()
            .zip(values.chunks_exact(d))
            .map(|(&row, v)| pb::FarPoint {
                point: Some(PointRef {
                    shard: id,
                    index: u64::from(row),
                }),
                label: shard.nearest[row as usize].best,
                distance: f64::from(shard.nearest[row as usize].best_dist),
                values: v.to_vec(),
            })
            .collect();
        out.push(pb::ShardPartial {
            shard: id,
            sums: partial.sums,
            counts: partial.counts,
            inertia,
            far,
        });
    }
    Ok(out)
}

/// Rows of the `m` largest distances (ties: lower row first), largest first.
pub fn farthest(nearest: &[Nearest], m: usize) -> Vec<u32> {
    let m = m.min(nearest.len());
    if m == 0 {
        return Vec::new();
    }
    let mut rows: Vec<u32> = (0..nearest.len() as u32).collect();
    let order = |a: &u32, b: &u32| {
        nearest[*b as usize]
            .best_dist
            .total_cmp(&nearest[*a as usize].best_dist)
            .then(a.cmp(b))
    };
    if m < rows.len() {
        rows.select_nth_unstable_by(m - 1, order);
        rows.truncate(m);
    }
    rows.sort_by(order);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(d: &[f32]) -> Vec<Nearest> {
        d.iter()
            .map(|&best_dist| Nearest {
                best: 0,
                best_dist,
                second: 1,
                second_dist: best_dist + 1.0,
            })
            .collect()
    }

    #[test]
    fn farthest_breaks_ties_by_row() {
        let n = near(&[1.0, 5.0, 3.0, 5.0, 0.0]);
        assert_eq!(farthest(&n, 3), vec![1, 3, 2]);
        assert_eq!(farthest(&n, 10), vec![1, 3, 2, 0, 4]);
        assert!(farthest(&n, 0).is_empty());
    }
}
