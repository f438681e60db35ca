//! ALS: link (id lists, confidences, initial factors), then per iteration a user
//! half-step and an item half-step, each given the other side's Gram matrix
//! reduced over its shards in shard order. Every `als.checkpoint_every`
//! iterations, and after the last, the workers write their shards' factors to
//! staging; a job that recovers links again from the last checkpoint and goes
//! on from its iteration. With a `[model]`, the fold-in instead.

use super::{Facts, in_shard_order};
use crate::CoordinatorError;
use crate::job::driver::Driver;
use crate::job::{Phase, Step};
use crate::model::Model;
use crate::output;
use crate::state::Progress;
use shoal_proto::pb;
use shoal_store::Location;
use std::time::Instant;
use tracing::{info, warn};

/// ALS as far as the job has got.
#[derive(Default)]
pub struct AlsProgress {
    /// Iterations whose factors are in the last checkpoint (0: none).
    pub checkpoint: u32,
    /// Loss and seconds of every iteration run so far.
    pub losses: Vec<f64>,
    pub seconds: Vec<f64>,
    /// Once ALS (or the fold-in) is over.
    pub facts: Option<output::AlsFacts>,
}

/// The folder of the checkpoint after `iteration` iterations.
fn checkpoint_folder(staging: &Location, iteration: u32) -> Location {
    staging.child(&format!("checkpoint/als-{iteration:05}"))
}

pub async fn run(d: &mut Driver<'_>, facts: &mut Facts) -> Result<(), CoordinatorError> {
    let t = Instant::now();
    d.phase(Phase::Als);
    let done = match &facts.plan.model {
        Some(model) => fold_in(d, model, facts.loaded().users).await?,
        None => train(d, facts).await?,
    };
    info!(
        items = done.items,
        pairs = done.pairs,
        loss = done.loss_per_iteration.last().copied().unwrap_or(f64::NAN),
        "ALS done"
    );
    facts.als.facts = Some(done);
    d.on.als = true;
    d.times.add("als", t);
    Ok(())
}

/// Fold-in: every worker solves its users' factors against the model's item
/// factors.
async fn fold_in(
    d: &Driver<'_>,
    model: &Model,
    n_users: u64,
) -> Result<output::AlsFacts, CoordinatorError> {
    let answers = d
        .all(|_, mut c| {
            let req = pb::AlsFoldInRequest {
                job_id: d.job_id(),
                attempt: d.attempt.0,
                model: model.folder.url(),
                item_parts: model.item_parts(),
            };
            async move { c.als_fold_in(req).await }
        })
        .await?;
    let items = answers.first().map_or(0, |a| a.items);
    let shards = in_shard_order(
        answers.into_iter().flat_map(|a| a.shards),
        d.shards,
        "als",
        |s| s.shard,
    )?;
    Ok(output::AlsFacts {
        factors: d.ctx.spec.als.factors,
        iterations: 0,
        users: n_users,
        items,
        pairs: shards.iter().map(|s| s.pairs).sum(),
        held_out_pairs: 0,
        nonpositive_pairs: 0,
        loss_per_iteration: Vec::new(),
        seconds_per_iteration: Vec::new(),
        evaluation: None,
        model: Some(output::ModelFacts {
            path: model.folder.url(),
            job_id: model.manifest.job_id.clone(),
            unknown_item_pairs: shards.iter().map(|s| s.unknown_item_pairs).sum(),
        }),
        recommend_users: None,
    })
}

/// Distributed implicit ALS, from the last checkpoint (the seeded factors at
/// first).
async fn train(
    d: &mut Driver<'_>,
    facts: &mut Facts,
) -> Result<output::AlsFacts, CoordinatorError> {
    let ctx = d.ctx;
    let spec = &ctx.spec.als;
    let f = spec.factors as usize;
    let loaded = facts.loaded.as_ref().expect("load runs before ALS");
    let items = &loaded.item_stats;
    let n_users = loaded.users;
    let staging = &facts.plan.staging;
    let resume = facts.als.checkpoint;
    facts.als.losses.truncate(resume as usize);
    facts.als.seconds.truncate(resume as usize);
    if resume > 0 {
        info!(iteration = resume, "ALS resumes from its checkpoint");
    }
    let owners: Vec<String> = (0..d.shards)
        .map(|s| d.crew[d.owner(s)].worker.address.clone())
        .collect();
    let linked = d
        .all(|_, mut c| {
            let req = pb::AlsLinkRequest {
                job_id: d.job_id(),
                attempt: d.attempt.0,
                owners: owners.clone(),
                item_owners: owners.clone(),
                item_shard_sizes: items.iter().map(|s| s.items).collect(),
                resume_iteration: resume,
                checkpoint: if resume > 0 {
                    checkpoint_folder(staging, resume).url()
                } else {
                    String::new()
                },
            };
            async move { c.als_link(req).await }
        })
        .await?;
    let grams = in_shard_order(
        linked.into_iter().flat_map(|l| l.item_shards),
        d.shards,
        "als",
        |g| g.shard,
    )?;
    let mut yty = reduce_grams(&grams, f, "als")?;
    let n_items: u64 = items.iter().map(|s| s.items).sum();
    let pairs: u64 = items.iter().map(|s| s.pairs).sum();
    let confidence: f64 = items.iter().map(|s| s.confidence_sum).sum();
    let cells = confidence + n_users as f64 * n_items as f64 - pairs as f64;
    let lambda = spec.regularization;
    for iteration in resume..spec.iterations {
        d.step = Step::at(Phase::Als, iteration);
        let started = Instant::now();
        let mut data_loss = 0.0;
        let mut traces = 0.0;
        let done = iteration + 1;
        let checkpoint =
            (done % spec.checkpoint_every == 0 || done == spec.iterations).then_some(done);
        for side in [pb::AlsSide::Users, pb::AlsSide::Items] {
            let gram = yty.clone();
            let folder = match (side, checkpoint) {
                (pb::AlsSide::Items, Some(c)) => checkpoint_folder(staging, c).url(),
                _ => String::new(),
            };
            let answers = d
                .all(|_, mut c| {
                    let req = pb::AlsStepRequest {
                        job_id: d.job_id(),
                        attempt: d.attempt.0,
                        iteration,
                        side: side as i32,
                        gram: gram.clone(),
                        checkpoint: folder.clone(),
                    };
                    async move { c.als_step(req).await }
                })
                .await?;
            let parts = in_shard_order(
                answers.into_iter().flat_map(|a| a.shards),
                d.shards,
                "als",
                |g| g.shard,
            )?;
            yty = reduce_grams(&parts, f, "als")?;
            traces += trace(&yty, f);
            data_loss += parts.iter().map(|p| p.data_loss).sum::<f64>();
        }
        let loss = (data_loss + lambda * traces) / cells.max(1.0);
        facts.als.losses.push(loss);
        facts.als.seconds.push(started.elapsed().as_secs_f64());
        if let Some(c) = checkpoint {
            // every shard of iteration c is written: it is the resume point, and
            // the older checkpoint goes
            let old = std::mem::replace(&mut facts.als.checkpoint, c);
            d.save_now(facts).await;
            if old > 0
                && let Err(e) = checkpoint_folder(staging, old).delete_all().await
            {
                warn!(error = %e, iteration = old, "could not remove an older ALS checkpoint");
            }
        }
        d.progress(Progress {
            iteration: Some(done),
            phase_progress: Some(f64::from(done) / f64::from(spec.iterations)),
            ..Default::default()
        });
        info!(iteration = done, loss, "ALS iteration");
    }
    Ok(output::AlsFacts {
        factors: spec.factors,
        iterations: spec.iterations,
        users: n_users,
        items: n_items,
        pairs,
        held_out_pairs: loaded.stats.values().map(|s| s.held_out).sum(),
        nonpositive_pairs: loaded.stats.values().map(|s| s.nonpositive).sum(),
        loss_per_iteration: facts.als.losses.clone(),
        seconds_per_iteration: facts.als.seconds.clone(),
        evaluation: None,
        model: None,
        recommend_users: None,
    })
}

/// Sums per-shard Gram matrices in shard order (the answers are in shard order).
fn reduce_grams(
    parts: &[pb::GramPartial],
    f: usize,
    step: &'static str,
) -> Result<Vec<f64>, CoordinatorError> {
    let mut total = vec![0.0f64; f * f];
    for p in parts {
        if p.gram.len() != f * f {
            return Err(CoordinatorError::Protocol {
                worker: "(all)".into(),
                step,
                detail: format!(
                    "shard {}: a Gram matrix of {} values for {f} factors",
                    p.shard,
                    p.gram.len()
                ),
            });
        }
        for (t, v) in total.iter_mut().zip(&p.gram) {
            *t += v;
        }
    }
    Ok(total)
}

fn trace(gram: &[f64], f: usize) -> f64 {
    (0..f).map(|i| gram[i * f + i]).sum()
}
