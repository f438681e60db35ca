//! The k-means steps on a worker's shards: scaling the features and uploading
//! them (Standardize), the k-means|| rounds (costs, samples, points by
//! reference), and the Lloyd rounds.

use crate::WorkerError;
use crate::extra;
use crate::job::{FitStates, JobState, resident, stop_if_cancelled};
use crate::steps::load::{DIMS, moments};
use shoal_kernels::{Backend, Nearest, Resident};
use shoal_proto::pb::{self, PointRef};
use shoal_spec::hash;

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
    // without an RFM block (features.rfm = false) the request has no RFM scaling
    let rfm = if req.mean.is_empty() { 0 } else { DIMS };
    if req.mean.len() != rfm || req.scale.len() != rfm {
        return Err(WorkerError::InvalidRequest(format!(
            "scaling needs {DIMS} means and scales (or none, without RFM)"
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
    let dims = f + rfm + e;
    if let Some(a) = job.als.as_mut() {
        a.end_training(backend)?;
    }
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
            if rfm > 0 {
                let row = shard.rfm.log_features(u);
                features.extend(
                    row.iter()
                        .enumerate()
                        .map(|(j, x)| ((x - req.mean[j]) / req.scale[j]) as f32),
                );
            }
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
        shard.fits = FitStates::default();
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

/// One Lloyd round of every fit of `req` on every shard: each point's nearest
/// centroid of the fit (exactly as a full `assign` pass would give it, through the
/// backend's bounded rounds: points whose label provably cannot change are
/// skipped), the sums, counts and inertia per shard and fit, and the fit's
/// `far_points` farthest points of each shard (candidates to re-seed empty
/// clusters). The inertia comes from the sums: `Σ‖x‖² − 2 Σ_c c·S_c + Σ_c n_c
/// ‖c‖²` in f64. Shards answer in shard order, each with its fits in request order.
pub fn lloyd(
    job: &mut JobState,
    job_id: &str,
    req: &pb::LloydStepRequest,
    backend: &dyn Backend,
) -> Result<Vec<pb::ShardPartial>, WorkerError> {
    job.check_dims(req.dims as usize, "centroids")?;
    let d = job.dims;
    let mut fits = Vec::with_capacity(req.fits.len());
    for f in &req.fits {
        let k = check_dims(req.dims, f.centroids.len(), "centroids")?;
        if k != f.k as usize || k == 0 {
            return Err(WorkerError::InvalidRequest(format!(
                "fit {}: {} centroids of {} dimensions is not k = {}",
                f.id,
                f.centroids.len(),
                req.dims,
                f.k
            )));
        }
        fits.push((f, k));
    }
    let mut out = Vec::new();
    for (&id, shard) in job.shards.iter_mut() {
        stop_if_cancelled(&job.cancel, job_id)?;
        for &(fit, k) in &fits {
            if shard.is_empty() {
                out.push(pb::ShardPartial {
                    shard: id,
                    fit: fit.id,
                    sums: vec![0.0; k * d],
                    counts: vec![0; k],
                    inertia: 0.0,
                    far: Vec::new(),
                });
                continue;
            }
            let points = resident(&shard.points, job_id, id)?;
            let state = shard
                .fits
                .of(req.group, fit.id, || Ok(backend.lloyd_bounds(points)?))?;
            state.labels.resize(shard.ids.len(), 0);
            let (_, partial) = backend.lloyd_round(
                points,
                &mut state.bounds,
                &fit.centroids,
                k,
                &mut state.labels,
            )?;
            let inertia = inertia_from_sums(shard.sum_sq, &partial, &fit.centroids, d);
            let far = backend.far_points(
                points,
                &state.bounds,
                &fit.centroids,
                k,
                fit.far_points as usize,
            )?;
            let far_rows: Vec<u32> = far.iter().map(|p| p.0).collect();
            let values = backend.download_rows(points, &far_rows)?;
            let far = far
                .iter()
                .zip(values.chunks_exact(d))
                .map(|(&(row, dist), v)| pb::FarPoint {
                    point: Some(PointRef {
                        shard: id,
                        index: u64::from(row),
                    }),
                    label: state.labels[row as usize],
                    distance: f64::from(dist),
                    values: v.to_vec(),
                })
                .collect();
            out.push(pb::ShardPartial {
                shard: id,
                fit: fit.id,
                sums: partial.sums,
                counts: partial.counts,
                inertia,
                far,
            });
        }
    }
    Ok(out)
}

/// The shard's `size` users with the smallest `hash(seed, user key)` (keys
/// `keys`), with their labels (`nearest`; 0 without): a sample whose union over
/// shards, cut to the smallest keys, is the same however shards are placed.
pub fn sample_points(
    keys: &[u64],
    nearest: Option<&[Nearest]>,
    points: &Resident,
    backend: &dyn Backend,
    seed: u64,
    size: usize,
    d: usize,
) -> Result<Vec<pb::SamplePoint>, WorkerError> {
    let mut keyed: Vec<(u64, u32)> = keys
        .iter()
        .enumerate()
        .map(|(i, &k)| (hash::key(seed, &[k]), i as u32))
        .collect();
    let size = size.min(keyed.len());
    if size == 0 {
        return Ok(Vec::new());
    }
    if size < keyed.len() {
        keyed.select_nth_unstable(size - 1);
        keyed.truncate(size);
    }
    keyed.sort_unstable();
    let rows: Vec<u32> = keyed.iter().map(|(_, r)| *r).collect();
    let values = backend.download_rows(points, &rows)?;
    Ok(keyed
        .iter()
        .zip(values.chunks_exact(d))
        .map(|((key, row), v)| pb::SamplePoint {
            key: *key,
            label: nearest.map_or(0, |n| n[*row as usize].best),
            values: v.to_vec(),
        })
        .collect())
}

/// The seeded sample of every shard (see [`sample_points`]), shard by shard.
pub fn sample(
    job: &JobState,
    job_id: &str,
    req: &pb::SamplePointsRequest,
    backend: &dyn Backend,
) -> Result<Vec<pb::SamplePoint>, WorkerError> {
    let mut out = Vec::new();
    for (&id, shard) in &job.shards {
        stop_if_cancelled(&job.cancel, job_id)?;
        if shard.is_empty() {
            continue;
        }
        out.extend(sample_points(
            shard.ids.keys(),
            None,
            shard.points(job_id, id)?,
            backend,
            req.seed,
            req.size as usize,
            job.dims,
        )?);
    }
    Ok(out)
}

/// The inertia of a labelling from its sums: `Σ‖x‖² − 2 Σ_c c·S_c + Σ_c n_c
/// ‖c‖²` (f64; at least 0).
pub fn inertia_from_sums(
    sum_sq: f64,
    partial: &shoal_kernels::PartialSums,
    centroids: &[f32],
    d: usize,
) -> f64 {
    let mut total = sum_sq;
    for ((c, s), &n) in centroids
        .chunks_exact(d)
        .zip(partial.sums.chunks_exact(d))
        .zip(&partial.counts)
    {
        let (mut cs, mut cc) = (0.0f64, 0.0f64);
        for (&cv, &sv) in c.iter().zip(s) {
            let cv = f64::from(cv);
            cs += cv * sv;
            cc += cv * cv;
        }
        total += n as f64 * cc - 2.0 * cs;
    }
    total.max(0.0)
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

    /// The bounded rounds of `lloyd` give the labels, sums and far points of full
    /// passes (the worker's Lloyd step before the bounds), round after round,
    /// centroids moved by the sums as the coordinator does (empty clusters
    /// keep theirs); the inertia from the sums agrees with the distances'.
    #[test]
    fn bounded_rounds_equal_full_passes() {
        use crate::ids::IdTable;
        use crate::job::Shard;
        use crate::steps::load::Rfm;
        use shoal_kernels::CpuBackend;
        use std::collections::BTreeMap;
        use std::sync::Arc;

        let backend = CpuBackend::new();
        let (d, k) = (9, 6);
        let mut state = JobState {
            attempt: 1,
            spec: Arc::new(shoal_spec::JobSpec::parse(shoal_spec::spec::DEMO_SPEC).unwrap()),
            shards: BTreeMap::new(),
            item_names: BTreeMap::new(),
            dims: d,
            als: None,
            als_weight: 1.0,
            extra_columns: Vec::new(),
            extra_weight: 1.0,
            extra_scaling: (Vec::new(), Vec::new()),
            fold_in: false,
            backend: Arc::new(backend),
            cancel: Default::default(),
        };
        let mut s = 7u64;
        let mut unit = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        for (id, n) in [(0u32, 3000usize), (3, 1), (5, 2500)] {
            let values: Vec<f32> = (0..n * d)
                .map(|i| unit() + (i / d % 4) as f32 * 3.0)
                .collect();
            let keys: Vec<u64> = (0..n as u64).collect();
            let ids =
                arrow::array::StringArray::from_iter_values(keys.iter().map(|k| k.to_string()));
            let mut shard = Shard::new(IdTable::new(keys, ids), Rfm::default());
            shard.sum_sq = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            shard.points = Some(backend.upload(&values, d).unwrap());
            state.shards.insert(id, shard);
        }
        // two fits side by side, each with its own bounds and labels
        let mut fits: Vec<Vec<f32>> = (0..2)
            .map(|_| (0..k * d).map(|_| unit() * 12.0).collect())
            .collect();
        for round in 0..8 {
            let req = pb::LloydStepRequest {
                job_id: "j".into(),
                attempt: 1,
                round,
                dims: d as u32,
                fits: fits
                    .iter()
                    .enumerate()
                    .map(|(id, c)| pb::Fit {
                        id: id as u32,
                        k: k as u32,
                        centroids: c.clone(),
                        far_points: k as u32,
                    })
                    .collect(),
                group: 0,
            };
            let got = lloyd(&mut state, "j", &req, &backend).unwrap();
            assert_eq!(got.len(), 2 * state.shards.len());
            for (fit, centroids) in fits.iter_mut().enumerate() {
                let mine = got.iter().filter(|p| p.fit == fit as u32);
                let (sums, counts) = check_fit(&state, mine, centroids, k, d, round);
                for (j, &n) in counts.iter().enumerate() {
                    if n > 0 {
                        for f in 0..d {
                            centroids[j * d + f] = (sums[j * d + f] / n as f64) as f32;
                        }
                    }
                }
            }
        }
    }

    /// Compares one fit's partials (one per shard, in shard order) with full
    /// passes; returns the summed sums and counts.
    fn check_fit<'a>(
        state: &JobState,
        partials: impl Iterator<Item = &'a pb::ShardPartial>,
        centroids: &[f32],
        k: usize,
        d: usize,
        round: u32,
    ) -> (Vec<f64>, Vec<u64>) {
        let backend = shoal_kernels::CpuBackend::new();
        let mut sums = vec![0.0f64; k * d];
        let mut counts = vec![0u64; k];
        for (p, (_, shard)) in partials.zip(&state.shards) {
            // the full pass, as the step did before the bounds
            let points = shard.points.as_ref().unwrap();
            let mut near = vec![Nearest::default(); shard.len()];
            backend.assign(points, centroids, k, &mut near).unwrap();
            let labels: Vec<u32> = near.iter().map(|n| n.best).collect();
            let partial = backend.partial_sums(points, &labels, k).unwrap();
            let inertia: f64 = near.iter().map(|n| f64::from(n.best_dist)).sum();
            let far = farthest(&near, k);
            assert_eq!(shard.fits.fits[&p.fit].labels, labels, "round {round}");
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p.sums), bits(&partial.sums), "round {round}");
            assert_eq!(p.counts, partial.counts);
            assert!(
                (p.inertia - inertia).abs() <= 1e-6 * inertia.max(1.0),
                "{} vs {inertia}",
                p.inertia
            );
            let got_far: Vec<(u64, u32, f64)> = p
                .far
                .iter()
                .map(|f| (f.point.as_ref().unwrap().index, f.label, f.distance))
                .collect();
            let want_far: Vec<(u64, u32, f64)> = far
                .iter()
                .map(|&r| {
                    (
                        u64::from(r),
                        near[r as usize].best,
                        f64::from(near[r as usize].best_dist),
                    )
                })
                .collect();
            assert_eq!(got_far, want_far, "round {round}");
            for (t, v) in sums.iter_mut().zip(&p.sums) {
                *t += v;
            }
            for (t, v) in counts.iter_mut().zip(&p.counts) {
                *t += v;
            }
        }
        (sums, counts)
    }

    #[test]
    fn farthest_breaks_ties_by_row() {
        let n = near(&[1.0, 5.0, 3.0, 5.0, 0.0]);
        assert_eq!(farthest(&n, 3), vec![1, 3, 2]);
        assert_eq!(farthest(&n, 10), vec![1, 3, 2, 0, 4]);
        assert!(farthest(&n, 0).is_empty());
    }
}
