//! The phases of a job, one module each, and [`advance`], which runs what is
//! left of them. Each phase reads what the earlier ones established from
//! [`Facts`] and records its own there; a phase whose work lives on the workers
//! checks [`super::driver::OnWorkers`] so that, after a recovery, it is run again
//! on the new placement.

pub mod als;
pub mod finalize;
pub mod ingest;
pub mod kmeans;
pub mod load;
pub mod plan;
pub mod scale;
pub mod write;

use super::driver::Driver;
use crate::CoordinatorError;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

/// What the job has established so far; kept across attempts.
pub struct Facts {
    pub plan: plan::Planned,
    pub ingest: ingest::Ingest,
    pub ingested: Option<ingest::Ingested>,
    pub loaded: Option<load::Loaded>,
    pub als: als::AlsProgress,
    pub scaled: Option<scale::Scaled>,
    pub init: Option<kmeans::Init>,
    pub lloyd: kmeans::Lloyd,
}

impl Facts {
    pub fn new(plan: plan::Planned) -> Facts {
        Facts {
            ingest: ingest::Ingest::new(&plan),
            plan,
            ingested: None,
            loaded: None,
            als: als::AlsProgress::default(),
            scaled: None,
            init: None,
            lloyd: kmeans::Lloyd::default(),
        }
    }

    pub fn ingested(&self) -> &ingest::Ingested {
        self.ingested.as_ref().expect("ingest runs first")
    }

    pub fn loaded(&self) -> &load::Loaded {
        self.loaded.as_ref().expect("load runs before this phase")
    }

    pub fn scaled(&self) -> &scale::Scaled {
        self.scaled.as_ref().expect("scale runs before this phase")
    }
}

/// Runs the phases from where the job is: each skips what is already done.
pub(super) async fn advance(
    d: &mut Driver<'_>,
    facts: &mut Facts,
    committing: &AtomicBool,
) -> Result<(), CoordinatorError> {
    if facts.ingested.is_none() {
        ingest::run(d, facts).await?;
    }
    if d.placement.is_none() {
        ingest::place(d, facts)?;
    }
    if !d.on.loaded {
        load::run(d, facts).await?;
    }
    if d.ctx.spec.features.als && !d.on.als {
        als::run(d, facts).await?;
    }
    if !d.on.scaled {
        scale::run(d, facts).await?;
    }
    if facts.plan.model.is_none() {
        if facts.init.is_none() {
            kmeans::init(d, facts).await?;
        }
        if !facts.lloyd.done {
            kmeans::lloyd(d, facts).await?;
        }
    }
    let finalized = finalize::run(d, facts).await?;
    write::run(d, facts, finalized, committing).await
}

/// Puts per-shard answers in shard order, checking every shard answered once.
pub fn in_shard_order<T>(
    items: impl Iterator<Item = T>,
    shards: u32,
    step: &'static str,
    shard_of: impl Fn(&T) -> u32,
) -> Result<Vec<T>, CoordinatorError> {
    let mut by: BTreeMap<u32, T> = BTreeMap::new();
    for item in items {
        let s = shard_of(&item);
        if by.insert(s, item).is_some() {
            return Err(CoordinatorError::Protocol {
                worker: "(all)".into(),
                step,
                detail: format!("shard {s} answered twice"),
            });
        }
    }
    if by.len() != shards as usize {
        return Err(CoordinatorError::Protocol {
            worker: "(all)".into(),
            step,
            detail: format!("{} of {shards} shards answered", by.len()),
        });
    }
    Ok(by.into_values().collect())
}
