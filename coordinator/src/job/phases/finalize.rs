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
}

pub async fn run(d: &mut Driver<'_>, facts: &Facts) -> Result<Finalized, CoordinatorError> {
    let t = Instant::now();
    d.phase(Phase::Finalize);
    let ctx = d.ctx;
    let spec = &ctx.spec;
    let scaled = facts.scaled();
    let (dims, factors) = (scaled.dims, scaled.factors);
    let (k, fitted) = match &facts.plan.model {
        // frozen centroids: nothing was fitted
        Some(model) => (model.k, &model.centroids),
        None => (facts.chosen().k, &facts.chosen().fit.centroids),
    };
    let money = factors + RFM_DIMS - 1;
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| {
        fitted[b * dims + money]
            .total_cmp(&fitted[a * dims + money])
            .then(a.cmp(&b))
    });
    let centroids: Vec<f32> = order
        .iter()
        .flat_map(|&c| fitted[c * dims..(c + 1) * dims].to_vec())
        .collect();
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
            rfm_at: factors,
            names: &scaled.names,
            extra_at: (scaled.extra_dims > 0)
                .then_some((factors + RFM_DIMS, spec.features.extra_weight)),
        },
        k,
        (&scaled.mean, &scaled.scale),
        scoring,
        SILHOUETTE_SAMPLE as usize,
    );
    summary.add_top_items(&item_counts);
    d.times.add("finalize", t);
    Ok(Finalized {
        centroids,
        shards,
        item_files,
        summary,
        audience,
    })
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
