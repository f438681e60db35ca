//! k-means: the k-means|| initialisation (Bahmani et al. 2012), then Lloyd
//! rounds until the centroids settle. Each round's centroids are kept: a job
//! that recovers goes on from the last finished round (the workers' distance
//! bounds are rebuilt; the bounded rounds label exactly as full passes do).

use super::{Facts, in_shard_order};
use crate::CoordinatorError;
use crate::job::driver::Driver;
use crate::job::{Phase, Step};
use crate::kmeans;
use crate::state::Progress;
use shoal_proto::pb::{self, PointRef};
use shoal_spec::hash;
use shoal_spec::spec::RFM_DIMS;
use std::time::Instant;
use tracing::info;

/// k-means|| rounds (Bahmani et al. suggest a handful).
pub const INIT_ROUNDS: u32 = 5;
/// Weighted k-means++ restarts on the candidate set.
const INIT_STARTS: usize = 10;

/// The initial centroids.
pub struct Init {
    pub centroids: Vec<f32>,
    /// k-means|| candidates they were chosen from.
    pub candidates: usize,
}

/// The Lloyd rounds as far as they have got.
#[derive(Default)]
pub struct Lloyd {
    /// Rounds finished; the centroids after the last (empty before the first).
    pub rounds: u32,
    pub centroids: Vec<f32>,
    pub inertia: Vec<f64>,
    pub reseeds: usize,
    pub converged: bool,
    pub done: bool,
}

pub async fn init(d: &mut Driver<'_>, facts: &mut Facts) -> Result<(), CoordinatorError> {
    let t = Instant::now();
    d.phase(Phase::Init);
    let (k, dims) = (facts.loaded().k, facts.scaled().dims);
    let seed = d.ctx.spec.segments.seed;
    let (candidates, n) = parallel(d, k, dims, seed, &facts.loaded().shard_users).await?;
    let weights = candidate_weights(d, &candidates, dims).await?;
    let centroids = kmeans::recluster(&candidates, dims, &weights, k, seed, INIT_STARTS);
    facts.init = Some(Init {
        centroids,
        candidates: n,
    });
    d.times.add("init", t);
    Ok(())
}

pub async fn lloyd(d: &mut Driver<'_>, facts: &mut Facts) -> Result<(), CoordinatorError> {
    let t = Instant::now();
    d.phase(Phase::Lloyd);
    let ctx = d.ctx;
    let segments = &ctx.spec.segments;
    let k = facts.loaded().k;
    let scaled = facts.scaled.as_ref().expect("scale runs before k-means");
    let (dims, factors) = (scaled.dims, scaled.factors);
    // scikit-learn's tolerance: relative to the mean variance of the features,
    // which is 1 for every standardised RFM feature and 0 for a constant one; the
    // factor block's and the extra table's (whose missing values sit at the
    // mean) as measured.
    let mean_var = (0..dims)
        .map(|j| match j.checked_sub(factors) {
            Some(r) if r < RFM_DIMS && scaled.scale[j] == 1.0 => 0.0,
            Some(r) if r < RFM_DIMS => 1.0,
            _ => scaled.variance[j],
        })
        .sum::<f64>()
        / dims as f64;
    let tol = segments.tol * if mean_var > 0.0 { mean_var } else { 1.0 };
    if facts.lloyd.rounds == 0 {
        facts.lloyd.centroids = facts
            .init
            .as_ref()
            .expect("init runs first")
            .centroids
            .clone();
    } else {
        info!(round = facts.lloyd.rounds + 1, "Lloyd rounds resume");
    }
    for round in facts.lloyd.rounds..segments.max_iter {
        d.step = Step::at(Phase::Lloyd, round);
        let centroids = &facts.lloyd.centroids;
        let partials = d
            .all(|_, mut c| {
                let req = pb::LloydStepRequest {
                    job_id: d.job_id(),
                    attempt: d.attempt.0,
                    round,
                    k: k as u32,
                    dims: dims as u32,
                    centroids: centroids.clone(),
                    far_points: k as u32,
                };
                async move { c.lloyd_step(req).await }
            })
            .await?;
        let partials = in_shard_order(
            partials.into_iter().flat_map(|p| p.shards),
            d.shards,
            "lloyd",
            |p| p.shard,
        )?;
        let r = kmeans::merge_round(&facts.lloyd.centroids, k, dims, &partials);
        facts.lloyd.inertia.push(r.inertia);
        facts.lloyd.reseeds += r.reseeded.len();
        facts.lloyd.centroids = r.centroids;
        facts.lloyd.rounds = round + 1;
        d.progress(Progress {
            iteration: Some(round + 1),
            inertia: Some(r.inertia),
            phase_progress: Some(f64::from(round + 1) / f64::from(segments.max_iter)),
            ..Default::default()
        });
        if r.reseeded.is_empty() && r.shift <= tol {
            facts.lloyd.converged = true;
            break;
        }
        d.save(facts);
    }
    facts.lloyd.done = true;
    d.save(facts);
    info!(
        iterations = facts.lloyd.inertia.len(),
        converged = facts.lloyd.converged,
        "k-means done"
    );
    d.times.add("lloyd", t);
    Ok(())
}

/// k-means|| (Bahmani et al. 2012): a first point drawn uniformly, then
/// `INIT_ROUNDS` rounds that each sample every point with probability
/// min(1, l * cost / total cost), l = 2k. Returns the candidates (row-major).
async fn parallel(
    d: &Driver<'_>,
    k: usize,
    dims: usize,
    seed: u64,
    shard_users: &[u64],
) -> Result<(Vec<f32>, usize), CoordinatorError> {
    let users: u64 = shard_users.iter().sum();
    // first center: the user at a seeded global position (shard order, then row)
    let mut pos = hash::key(seed, &[0x1417]) % users;
    let mut first = PointRef::default();
    for (s, &n) in shard_users.iter().enumerate() {
        if pos < n {
            first = PointRef {
                shard: s as u32,
                index: pos,
            };
            break;
        }
        pos -= n;
    }
    let owner = &d.crew[d.owner(first.shard)];
    let got = owner
        .call(Phase::Init.as_str(), |mut c| {
            let req = pb::GetPointsRequest {
                job_id: d.job_id(),
                points: vec![first],
            };
            async move { c.get_points(req).await }
        })
        .await?;
    let mut candidates = got.values;
    let mut new_centers = candidates.clone();
    let oversampling = 2.0 * k as f64;
    for round in 1..=INIT_ROUNDS {
        let costs = d
            .all(|_, mut c| {
                let req = pb::InitCostsRequest {
                    job_id: d.job_id(),
                    attempt: d.attempt.0,
                    round,
                    dims: dims as u32,
                    new_centers: new_centers.clone(),
                };
                async move { c.init_costs(req).await }
            })
            .await?;
        let costs = in_shard_order(
            costs.into_iter().flat_map(|c| c.shards),
            d.shards,
            "init",
            |c| c.shard,
        )?;
        let total: f64 = costs.iter().map(|c| c.cost).sum();
        d.progress(Progress {
            phase_progress: Some(f64::from(round) / f64::from(INIT_ROUNDS)),
            ..Default::default()
        });
        if total <= 0.0 {
            break;
        }
        let sampled = d
            .all(|_, mut c| {
                let req = pb::InitSampleRequest {
                    job_id: d.job_id(),
                    attempt: d.attempt.0,
                    round,
                    total_cost: total,
                    oversampling,
                    seed,
                };
                async move { c.init_sample(req).await }
            })
            .await?;
        let mut points: Vec<pb::SampledPoint> =
            sampled.into_iter().flat_map(|s| s.points).collect();
        points.sort_by_key(|p| p.point.map(|r| (r.shard, r.index)));
        new_centers = points
            .iter()
            .flat_map(|p| p.values.iter().copied())
            .collect();
        candidates.extend_from_slice(&new_centers);
    }
    let n = candidates.len() / dims;
    info!(candidates = n, "k-means|| candidates");
    Ok((candidates, n))
}

/// The weight of each candidate: how many users are nearest to it.
async fn candidate_weights(
    d: &Driver<'_>,
    candidates: &[f32],
    dims: usize,
) -> Result<Vec<f64>, CoordinatorError> {
    let c = candidates.len() / dims;
    let partials = d
        .all(|_, mut cl| {
            let req = pb::LloydStepRequest {
                job_id: d.job_id(),
                attempt: d.attempt.0,
                round: u32::MAX,
                k: c as u32,
                dims: dims as u32,
                centroids: candidates.to_vec(),
                far_points: 0,
            };
            async move { cl.lloyd_step(req).await }
        })
        .await?;
    let partials = in_shard_order(
        partials.into_iter().flat_map(|p| p.shards),
        d.shards,
        "init",
        |p| p.shard,
    )?;
    let mut weights = vec![0.0f64; c];
    for p in &partials {
        for (w, n) in weights.iter_mut().zip(&p.counts) {
            *w += *n as f64;
        }
    }
    Ok(weights)
}
