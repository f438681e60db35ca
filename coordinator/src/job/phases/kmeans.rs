//! k-means: the k-means|| initialisation (Bahmani et al. 2012) draws one pool of
//! candidates for every fit; then, for each candidate k in turn, `segments.starts`
//! seeded starts (weighted k-means++ over the pool) run their Lloyd rounds side by
//! side in the same distributed rounds until each settles, and the start with the
//! lowest inertia is kept. With several candidates of k, [`choose`] measures each
//! on a seeded sample of users and picks one by the rule of [`kchoice`]. Every
//! round's centroids are kept: a job that recovers goes on from the last finished
//! round (the workers' distance bounds are rebuilt; the bounded rounds label
//! exactly as full passes do).

use super::{Facts, in_shard_order};
use crate::CoordinatorError;
use crate::job::driver::Driver;
use crate::job::{Phase, Step};
use crate::kchoice::{self, KChoiceFacts, KMetrics};
use crate::kmeans;
use crate::state::Progress;
use shoal_proto::pb::{self, PointRef};
use shoal_spec::hash;
use shoal_spec::spec::RFM_DIMS;
use std::time::Instant;
use tracing::info;

/// k-means|| rounds (Bahmani et al. suggest a handful).
pub const INIT_ROUNDS: u32 = 5;
/// Weighted k-means++ restarts on the candidate pool, per start.
const INIT_STARTS: usize = 10;
/// Users in the sample that measures the candidates of k.
const CHOICE_SAMPLE: u32 = 2_000;
/// The group of the candidates' weights pass (no fit group uses it).
const WEIGHTS_GROUP: u32 = u32::MAX;

/// The k-means|| candidate pool every start draws from.
pub struct Init {
    /// Row-major, `count` of them.
    pub candidates: Vec<f32>,
    /// Users nearest to each candidate.
    pub weights: Vec<f64>,
    pub count: usize,
}

/// One start of one k, as far as its Lloyd rounds have got.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    pub k: usize,
    pub start: u32,
    /// Rounds finished; the centroids after the last (the initial ones before).
    pub rounds: u32,
    pub centroids: Vec<f32>,
    pub inertia: Vec<f64>,
    pub reseeds: usize,
    pub converged: bool,
}

impl Fit {
    /// The inertia of its last round (infinite before the first).
    pub fn final_inertia(&self) -> f64 {
        self.inertia.last().copied().unwrap_or(f64::INFINITY)
    }
}

/// The fits as far as they have got: those of the candidates of k before
/// `group` are finished.
#[derive(Default)]
pub struct Lloyd {
    pub fits: Vec<Fit>,
    pub group: usize,
    pub done: bool,
}

impl Lloyd {
    /// The starts of `k`, in start order.
    pub fn of(&self, k: usize) -> impl Iterator<Item = &Fit> {
        self.fits.iter().filter(move |f| f.k == k)
    }

    /// The start of `k` with the lowest final inertia (ties: the first).
    pub fn best(&self, k: usize) -> Option<&Fit> {
        self.of(k).fold(None, |best: Option<&Fit>, f| match best {
            Some(b) if b.final_inertia() <= f.final_inertia() => best,
            _ => Some(f),
        })
    }
}

/// The segments the job goes on with.
pub struct Chosen {
    pub k: usize,
    pub fit: Fit,
    /// The final inertia of every start of that k.
    pub start_inertia: Vec<f64>,
    /// How k was chosen (with several candidates).
    pub choice: Option<KChoiceFacts>,
}

/// The candidates of k, ascending.
pub fn candidates(d: &Driver<'_>) -> Vec<usize> {
    d.ctx
        .spec
        .segments
        .k
        .candidates()
        .into_iter()
        .map(|k| k as usize)
        .collect()
}

pub async fn init(d: &mut Driver<'_>, facts: &mut Facts) -> Result<(), CoordinatorError> {
    let t = Instant::now();
    d.phase(Phase::Init);
    let k_max = candidates(d).last().copied().unwrap_or(1);
    let dims = facts.scaled().dims;
    let seed = d.ctx.spec.segments.seed;
    let (candidates, count) = parallel(d, k_max, dims, seed, &facts.loaded().shard_users).await?;
    let weights = candidate_weights(d, &candidates, dims).await?;
    facts.init = Some(Init {
        candidates,
        weights,
        count,
    });
    d.times.add("init", t);
    Ok(())
}

/// The initial centroids of start `start` of `k`: weighted k-means++ over the
/// pool (best of [`INIT_STARTS`]), seeded by the spec's seed, k and the start.
fn initial(init: &Init, dims: usize, k: usize, start: u32, seed: u64) -> Vec<f32> {
    let seed = if start == 0 {
        seed
    } else {
        hash::key(seed, &[0x57a7, k as u64, u64::from(start)])
    };
    kmeans::recluster(&init.candidates, dims, &init.weights, k, seed, INIT_STARTS)
}

pub async fn lloyd(d: &mut Driver<'_>, facts: &mut Facts) -> Result<(), CoordinatorError> {
    let t = Instant::now();
    d.phase(Phase::Lloyd);
    let ks = candidates(d);
    let tol = tolerance(d, facts);
    let (dims, seed) = (facts.scaled().dims, d.ctx.spec.segments.seed);
    let starts = d.ctx.spec.segments.starts;
    if facts.lloyd.fits.iter().any(|f| f.rounds > 0) {
        info!(candidate = facts.lloyd.group + 1, "Lloyd rounds resume");
    }
    while facts.lloyd.group < ks.len() {
        let (g, k) = (facts.lloyd.group, ks[facts.lloyd.group]);
        if facts.lloyd.of(k).next().is_none() {
            let init = facts.init.as_ref().expect("init runs first");
            for start in 0..starts {
                facts.lloyd.fits.push(Fit {
                    k,
                    start,
                    rounds: 0,
                    centroids: initial(init, dims, k, start, seed),
                    inertia: Vec::new(),
                    reseeds: 0,
                    converged: false,
                });
            }
        }
        fit_group(d, facts, (g, ks.len()), k, dims, tol).await?;
        facts.lloyd.group += 1;
        d.save(facts);
    }
    facts.lloyd.done = true;
    d.save(facts);
    let best: Vec<(usize, usize, bool)> = ks
        .iter()
        .filter_map(|&k| facts.lloyd.best(k))
        .map(|f| (f.k, f.inertia.len(), f.converged))
        .collect();
    info!(fits = facts.lloyd.fits.len(), best = ?best, "k-means done");
    d.times.add("lloyd", t);
    Ok(())
}

/// scikit-learn's tolerance: relative to the mean variance of the features,
/// which is 1 for every standardised RFM feature and 0 for a constant one; the
/// factor block's and the extra table's (whose missing values sit at the mean) as
/// measured.
fn tolerance(d: &Driver<'_>, facts: &Facts) -> f64 {
    let scaled = facts.scaled();
    let (dims, factors) = (scaled.dims, scaled.factors);
    let rfm = d.ctx.spec.features.rfm;
    let mean_var = (0..dims)
        .map(|j| match j.checked_sub(factors) {
            Some(r) if rfm && r < RFM_DIMS && scaled.scale[j] == 1.0 => 0.0,
            Some(r) if rfm && r < RFM_DIMS => 1.0,
            _ => scaled.variance[j],
        })
        .sum::<f64>()
        / dims as f64;
    d.ctx.spec.segments.tol * if mean_var > 0.0 { mean_var } else { 1.0 }
}

/// The Lloyd rounds of every start of `k` (group `g` of `groups`), side by side,
/// until each settles or reaches `segments.max_iter`.
async fn fit_group(
    d: &mut Driver<'_>,
    facts: &mut Facts,
    (g, groups): (usize, usize),
    k: usize,
    dims: usize,
    tol: f64,
) -> Result<(), CoordinatorError> {
    let max_iter = d.ctx.spec.segments.max_iter;
    loop {
        let active: Vec<usize> = (0..facts.lloyd.fits.len())
            .filter(|&i| {
                let f = &facts.lloyd.fits[i];
                f.k == k && !f.converged && f.rounds < max_iter
            })
            .collect();
        let Some(&first) = active.first() else {
            return Ok(());
        };
        let round = facts.lloyd.fits[first].rounds;
        d.step = Step::round_of(k, round);
        let fits: Vec<pb::Fit> = active
            .iter()
            .map(|&i| {
                let f = &facts.lloyd.fits[i];
                pb::Fit {
                    id: f.start,
                    k: k as u32,
                    centroids: f.centroids.clone(),
                    far_points: k as u32,
                }
            })
            .collect();
        let partials = lloyd_round(d, round, g as u32, dims, fits).await?;
        let mut lowest = f64::INFINITY;
        for &i in &active {
            let f = &mut facts.lloyd.fits[i];
            let mine: Vec<pb::ShardPartial> = partials
                .iter()
                .filter(|p| p.fit == f.start)
                .cloned()
                .collect();
            let r = kmeans::merge_round(&f.centroids, k, dims, &mine);
            f.inertia.push(r.inertia);
            f.reseeds += r.reseeded.len();
            f.centroids = r.centroids;
            f.rounds = round + 1;
            f.converged = r.reseeded.is_empty() && r.shift <= tol;
            lowest = lowest.min(r.inertia);
        }
        d.progress(Progress {
            iteration: Some(round + 1),
            inertia: Some(lowest),
            phase_progress: Some(
                (g as f64 + f64::from(round + 1) / f64::from(max_iter)) / groups as f64,
            ),
            ..Default::default()
        });
        d.save(facts);
    }
}

/// One Lloyd round of `fits` on every shard; the partials of every shard in shard
/// order (each shard's fits together).
async fn lloyd_round(
    d: &Driver<'_>,
    round: u32,
    group: u32,
    dims: usize,
    fits: Vec<pb::Fit>,
) -> Result<Vec<pb::ShardPartial>, CoordinatorError> {
    let n = fits.len();
    let partials = d
        .all(|_, mut c| {
            let req = pb::LloydStepRequest {
                job_id: d.job_id(),
                attempt: d.attempt.0,
                round,
                dims: dims as u32,
                fits: fits.clone(),
                group,
            };
            async move { c.lloyd_step(req).await }
        })
        .await?;
    let mut flat: Vec<pb::ShardPartial> = partials.into_iter().flat_map(|p| p.shards).collect();
    if flat.len() != d.shards as usize * n {
        return Err(CoordinatorError::Protocol {
            worker: "(all)".into(),
            step: "lloyd",
            detail: format!(
                "{} partials for {} shards and {n} fits",
                flat.len(),
                d.shards
            ),
        });
    }
    flat.sort_by_key(|p| (p.shard, p.fit));
    // every shard once per fit
    for f in 0..n {
        in_shard_order(flat.iter().skip(f).step_by(n), d.shards, "lloyd", |p| {
            p.shard
        })?;
    }
    Ok(flat)
}

/// The segments the job goes on with: the best start of the one candidate of k,
/// or, with several, the candidate the rule picks from their figures on a seeded
/// sample of users.
pub async fn choose(d: &mut Driver<'_>, facts: &Facts) -> Result<Chosen, CoordinatorError> {
    let ks = candidates(d);
    let dims = facts.scaled().dims;
    let chosen = |k: usize, choice: Option<KChoiceFacts>| -> Chosen {
        Chosen {
            k,
            fit: facts
                .lloyd
                .best(k)
                .expect("every candidate is fitted")
                .clone(),
            start_inertia: facts.lloyd.of(k).map(Fit::final_inertia).collect(),
            choice,
        }
    };
    if ks.len() == 1 {
        return Ok(chosen(ks[0], None));
    }
    let t = Instant::now();
    d.step = Step::choosing();
    let seed = d.ctx.spec.segments.seed;
    let sample = sample(d, CHOICE_SAMPLE, hash::key(seed, &[0xc40c])).await?;
    let rows: Vec<KMetrics> = ks
        .iter()
        .map(|&k| {
            let best = facts.lloyd.best(k).expect("every candidate is fitted");
            let (silhouette, davies_bouldin, calinski_harabasz) =
                kchoice::sample_indices(&sample, dims, &best.centroids, k);
            KMetrics {
                k: k as u32,
                inertia: best.final_inertia(),
                start_inertia: facts.lloyd.of(k).map(Fit::final_inertia).collect(),
                silhouette,
                davies_bouldin,
                calinski_harabasz,
                stability: kchoice::stability(&sample, dims, k, seed, kchoice::STABILITY_PAIRS),
            }
        })
        .collect();
    let pick = kchoice::choose(&rows);
    let k = ks[pick];
    info!(
        k,
        seconds = t.elapsed().as_secs_f64(),
        "number of segments chosen"
    );
    d.times.add("choose", t);
    Ok(chosen(
        k,
        Some(KChoiceFacts {
            chosen: k as u32,
            candidates: rows,
            rule: kchoice::RULE,
            sample: sample.len() / dims.max(1),
            stability_pairs: kchoice::STABILITY_PAIRS,
        }),
    ))
}

/// The `size` users with the smallest `hash(seed, user)` over every shard, their
/// scaled features row-major in key order (the same whatever the placement).
async fn sample(d: &Driver<'_>, size: u32, seed: u64) -> Result<Vec<f32>, CoordinatorError> {
    let answers = d
        .all(|_, mut c| {
            let req = pb::SamplePointsRequest {
                job_id: d.job_id(),
                attempt: d.attempt.0,
                size,
                seed,
            };
            async move { c.sample_points(req).await }
        })
        .await?;
    let mut points: Vec<pb::SamplePoint> = answers.into_iter().flat_map(|a| a.points).collect();
    points.sort_by_key(|p| p.key);
    points.truncate(size as usize);
    Ok(points.into_iter().flat_map(|p| p.values).collect())
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
    let pool = pb::Fit {
        id: 0,
        k: c as u32,
        centroids: candidates.to_vec(),
        far_points: 0,
    };
    let partials = lloyd_round(d, u32::MAX, WEIGHTS_GROUP, dims, vec![pool]).await?;
    let mut weights = vec![0.0f64; c];
    for p in &partials {
        for (w, n) in weights.iter_mut().zip(&p.counts) {
            *w += *n as f64;
        }
    }
    Ok(weights)
}
