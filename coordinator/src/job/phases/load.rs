//! Load: every worker builds its placed shards from staging (RFM, the user-side
//! CSR and item-side CSC, the extra table's rows). Run again after a recovery,
//! on the new placement: the statistics it answers are the same.

use super::Facts;
use crate::CoordinatorError;
use crate::job::Phase;
use crate::job::driver::Driver;
use crate::state::Progress;
use shoal_proto::pb;
use shoal_spec::JobSpec;
use shoal_spec::rfm::{Quintiles, Scoring};
use std::collections::BTreeMap;
use std::time::Instant;

/// What the load established.
pub struct Loaded {
    pub stats: BTreeMap<u32, pb::ShardStats>,
    /// In shard order (with ALS).
    pub item_stats: Vec<pb::ItemShardStats>,
    /// Features per user before ALS and scaling (the RFM block).
    pub dims: usize,
    pub shard_users: Vec<u64>,
    pub users: u64,
    /// The RFM quintiles of the job's customers.
    pub scoring: Scoring,
}

/// The RFM quintiles of the job's customers, from the shards' key histograms: a
/// log without event times scores no recency, one without money no monetary
/// value.
fn scoring(spec: &JobSpec, stats: &BTreeMap<u32, pb::ShardStats>) -> Scoring {
    let merged = |metric: usize| {
        let all: Vec<(i64, u64)> = stats
            .values()
            .filter_map(|s| s.rfm_keys.get(metric))
            .flat_map(|h| h.keys.iter().copied().zip(h.counts.iter().copied()))
            .collect();
        Quintiles::from_histogram(&all)
    };
    let c = &spec.input.columns;
    let money = c.amount().is_some() || c.price().is_some();
    Scoring {
        recency: c.time().and_then(|_| merged(0)),
        frequency: merged(1),
        monetary: if money { merged(2) } else { None },
    }
}

pub async fn run(d: &mut Driver<'_>, facts: &mut Facts) -> Result<(), CoordinatorError> {
    let t = Instant::now();
    d.phase(Phase::Load);
    let spec = &d.ctx.spec;
    let job_ctx = d.job_context(facts);
    let ingested = facts.ingested();
    let model = facts.plan.model.as_ref();
    let d_ref = &*d;
    let loaded = d_ref
        .all(|m, mut c| {
            let req = pb::LoadShardsRequest {
                job: Some(job_ctx.clone()),
                attempt: d_ref.attempt.0,
                shards: d_ref.shards_of(m),
                reference_time_ms: ingested.reference_ms,
                item_shards: if spec.features.als && model.is_none() {
                    d_ref.shards_of(m)
                } else {
                    Vec::new()
                },
                extra_columns: ingested.extra_columns.clone(),
                memory_estimate_bytes: d_ref.placement().need[m],
            };
            async move { c.load_shards(req).await }
        })
        .await?;
    let dims = loaded.first().map(|l| l.dims as usize).unwrap_or(0);
    let mut stats: BTreeMap<u32, pb::ShardStats> = BTreeMap::new();
    let mut item_stats: Vec<pb::ItemShardStats> = Vec::new();
    for (m, l) in loaded.into_iter().enumerate() {
        item_stats.extend(l.item_shards);
        if l.dims as usize != dims {
            return Err(CoordinatorError::Protocol {
                worker: d.crew[m].worker.id.to_string(),
                step: "load",
                detail: format!("{} dimensions, others have {dims}", l.dims),
            });
        }
        for s in l.shards {
            stats.insert(s.shard, s);
        }
    }
    if stats.len() != d.shards as usize {
        return Err(CoordinatorError::Protocol {
            worker: "(all)".into(),
            step: "load",
            detail: format!("{} of {} shards reported", stats.len(), d.shards),
        });
    }
    let item_stats = if spec.features.als && model.is_none() {
        super::in_shard_order(item_stats.into_iter(), d.shards, "load", |s| s.shard)?
    } else {
        item_stats
    };
    let shard_users: Vec<u64> = stats.values().map(|s| s.users).collect();
    let users: u64 = shard_users.iter().sum();
    d.progress(Progress {
        users: Some(users),
        ..Default::default()
    });
    let k = model.map_or(spec.segments.k.max() as usize, |m| m.k);
    if model.is_none() && users < k as u64 {
        return Err(CoordinatorError::TooFewUsers {
            k: spec.segments.k.to_string(),
            largest: spec.segments.k.max(),
            users,
        });
    }
    facts.loaded = Some(Loaded {
        scoring: scoring(spec, &stats),
        stats,
        item_stats,
        dims,
        shard_users,
        users,
    });
    d.on.loaded = true;
    d.times.add("load", t);
    Ok(())
}
