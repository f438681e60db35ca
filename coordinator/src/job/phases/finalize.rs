//! Finalize: segments ordered by monetary centroid, highest first; every worker
//! labels its users, writes its shards' parts (assignments, factors,
//! recommendations) and answers its sums, samples and item counts, merged here
//! into the segments' summary. A finalize that ran part way is run again whole:
//! its parts are named by shard and hold the same rows whoever writes them.

use super::{Facts, in_shard_order};
use crate::CoordinatorError;
use crate::job::Phase;
use crate::job::driver::Driver;
use crate::output::{self, Summary};
use crate::previous::{self, Migration, Overlap, Previous};
use shoal_proto::pb;
use shoal_spec::rfm::Quintiles;
use shoal_spec::spec::RFM_DIMS;
use std::time::Instant;

/// Users in the silhouette sample.
const SILHOUETTE_SAMPLE: u32 = 10_000;

/// What finalize established.
pub struct Finalized {
    /// In segment order (row-major).
    pub centroids: Vec<f32>,
    pub shards: Vec<pb::ShardFinal>,
    pub item_files: Vec<pb::WrittenFile>,
    pub summary: Summary,
    pub audience: Option<output::AudienceFacts>,
    /// segments.previous: how customers moved.
    pub migration: Option<Migration>,
}

pub async fn run(d: &mut Driver<'_>, facts: &Facts) -> Result<Finalized, CoordinatorError> {
    let t = Instant::now();
    d.phase(Phase::Finalize);
    let ctx = d.ctx;
    let spec = &ctx.spec;
    let scaled = facts.scaled();
    let (dims, factors) = (scaled.dims, scaled.factors);
    let (centroids, ids, migration) = segments(d, facts).await?;
    let k = ids.len();
    let output = &facts.plan.output;
    let scoring = &facts.loaded().scoring;
    let quintiles: Vec<pb::QuintileCuts> =
        [&scoring.recency, &scoring.frequency, &scoring.monetary]
            .into_iter()
            .map(cuts)
            .collect();
    let d_ref = &*d;
    let finals = d_ref
        .all(|_, mut c| {
            let req = pb::FinalizeRequest {
                job_id: d_ref.job_id(),
                attempt: d_ref.attempt.0,
                k: k as u32,
                dims: dims as u32,
                centroids: centroids.clone(),
                output: output.url(),
                sample_size: SILHOUETTE_SAMPLE,
                seed: spec.segments.seed,
                rfm_quintiles: quintiles.clone(),
                segment_ids: ids.clone(),
            };
            async move { c.finalize(req).await }
        })
        .await?;
    let mut item_files: Vec<pb::WrittenFile> = finals
        .iter()
        .flat_map(|f| f.item_files.iter().cloned())
        .collect();
    let item_counts = output::ItemCounts::merge(&finals, k)?;
    let audience = spec.recommend.users().map(|source| output::AudienceFacts {
        source: source.to_string(),
        requested: finals.iter().map(|f| f.recommend_requested).sum(),
        unknown: finals.iter().map(|f| f.recommend_unknown).sum(),
    });
    if let Some(model) = &facts.plan.model {
        // the item factors scored against belong to the outputs too
        item_files = output::copy_item_factors(model, output).await?;
    }
    // the manifest lists them in one order whatever the number of workers
    item_files.sort_by(|a, b| a.path.cmp(&b.path));
    let shards = in_shard_order(
        finals.into_iter().flat_map(|f| f.shards),
        d.shards,
        "finalize",
        |f| f.shard,
    )?;
    let mut summary = output::summarize(
        &shards,
        &centroids,
        output::Layout {
            dims,
            rfm_at: spec.features.rfm.then_some(factors),
            names: &scaled.names,
            extra_at: (scaled.extra_dims > 0)
                .then_some((factors + spec.rfm_dims(), spec.features.extra_weight)),
        },
        k,
        (&scaled.mean, &scaled.scale),
        scoring,
        SILHOUETTE_SAMPLE as usize,
    );
    summary.add_top_items(&item_counts);
    for (s, &id) in summary.segments.iter_mut().zip(&ids) {
        s.segment = id;
    }
    d.times.add("finalize", t);
    Ok(Finalized {
        centroids,
        shards,
        item_files,
        summary,
        audience,
        migration,
    })
}

/// The centroids in segment order and their ids: a fit's ordered by the
/// monetary value of their centroid, highest first (without RFM: as fitted),
/// numbered from 0, or with `segments.previous` numbered after the earlier run's
/// segments they match (in id order), with the migration; a model's as the
/// model numbered them.
async fn segments(
    d: &mut Driver<'_>,
    facts: &Facts,
) -> Result<(Vec<f32>, Vec<u32>, Option<Migration>), CoordinatorError> {
    let scaled = facts.scaled();
    let (dims, factors) = (scaled.dims, scaled.factors);
    let (fitted, fitted_ids) = match &facts.plan.model {
        // frozen centroids: nothing was fitted
        Some(model) => (&model.centroids, Some(&model.ids)),
        None => (&facts.chosen().fit.centroids, None),
    };
    let k = fitted.len() / dims;
    let mut order: Vec<usize> = (0..k).collect();
    if d.ctx.spec.features.rfm {
        let money = factors + RFM_DIMS - 1;
        order.sort_by(|&a, &b| {
            fitted[b * dims + money]
                .total_cmp(&fitted[a * dims + money])
                .then(a.cmp(&b))
        });
    }
    let centroids: Vec<f32> = order
        .iter()
        .flat_map(|&c| fitted[c * dims..(c + 1) * dims].to_vec())
        .collect();
    if let Some(ids) = fitted_ids {
        let ids = order
            .iter()
            .map(|&c| ids.get(c).copied().unwrap_or(c as u32))
            .collect();
        return Ok((centroids, ids, None));
    }
    let Some(previous) = &facts.plan.previous else {
        return Ok((centroids, (0..k as u32).collect(), None));
    };
    let overlap = overlap(d, previous, &centroids, dims).await?;
    let matched = previous::match_segments(previous, &overlap, &centroids, dims);
    // segment order is id order
    let mut by_id: Vec<(u32, usize)> = matched.ids.iter().copied().zip(0..).collect();
    by_id.sort_unstable();
    let centroids = by_id
        .iter()
        .flat_map(|&(_, c)| centroids[c * dims..(c + 1) * dims].to_vec())
        .collect();
    let ids = by_id.iter().map(|&(id, _)| id).collect();
    Ok((centroids, ids, Some(matched.migration)))
}

/// Where this job's customers were in the earlier run, from every shard (merged
/// in shard order).
async fn overlap(
    d: &Driver<'_>,
    previous: &Previous,
    centroids: &[f32],
    dims: usize,
) -> Result<Overlap, CoordinatorError> {
    let k = centroids.len() / dims;
    let old: Vec<u32> = previous.segments.iter().map(|s| s.0).collect();
    let answers = d
        .all(|_, mut c| {
            let req = pb::PreviousRequest {
                job_id: d.job_id(),
                attempt: d.attempt.0,
                folder: previous.folder.url(),
                parts: previous.parts.clone(),
                shards: previous.shards,
                previous_ids: old.clone(),
                k: k as u32,
                dims: dims as u32,
                centroids: centroids.to_vec(),
            };
            async move { c.previous_overlap(req).await }
        })
        .await?;
    let shards = in_shard_order(
        answers.into_iter().flat_map(|a| a.shards),
        d.shards,
        "previous",
        |s| s.shard,
    )?;
    let mut o = Overlap {
        counts: vec![0; old.len()],
        sums: vec![0.0; old.len() * dims],
        moves: vec![0; old.len() * k],
        new_users: vec![0; k],
    };
    for s in &shards {
        let add = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut o.counts, &s.counts);
        add(&mut o.moves, &s.moves);
        add(&mut o.new_users, &s.new_users);
        o.sums.iter_mut().zip(&s.sums).for_each(|(x, y)| *x += y);
    }
    Ok(o)
}

/// One metric's quintile cuts on the wire (none: empty).
fn cuts(q: &Option<Quintiles>) -> pb::QuintileCuts {
    match q {
        Some(q) => pb::QuintileCuts {
            keys: q.cuts.iter().map(|c| c.key).collect(),
            ties: q.cuts.iter().map(|c| c.tie).collect(),
        },
        None => pb::QuintileCuts::default(),
    }
}
