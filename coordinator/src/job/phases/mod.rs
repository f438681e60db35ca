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
use super::{Attempt, Resume};
use crate::CoordinatorError;
use shoal_proto::pb;
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
    pub chosen: Option<kmeans::Chosen>,
}

impl Facts {
    /// What survives the workers, for the coordinator's state.
    pub fn stored(&self, attempt: Attempt) -> pb::StoredProgress {
        let init = self.init.as_ref();
        let l = &self.lloyd;
        pb::StoredProgress {
            attempt: attempt.0,
            ingested: self.ingested.is_some(),
            als_checkpoint: self.als.checkpoint,
            als_losses: self.als.losses[..self.als.checkpoint as usize].to_vec(),
            als_seconds: self.als.seconds[..self.als.checkpoint as usize].to_vec(),
            init_done: init.is_some(),
            init_centroids: init.map(|i| i.candidates.clone()).unwrap_or_default(),
            init_candidates: init.map_or(0, |i| i.count as u64),
            init_weights: init.map(|i| i.weights.clone()).unwrap_or_default(),
            fits: l
                .fits
                .iter()
                .map(|f| pb::StoredFit {
                    k: f.k as u32,
                    start: f.start,
                    rounds: f.rounds,
                    centroids: f.centroids.clone(),
                    inertia: f.inertia.clone(),
                    reseeds: f.reseeds as u64,
                    converged: f.converged,
                })
                .collect(),
            fit_group: l.group as u32,
            lloyd_done: l.done,
        }
    }

    /// Takes back what a job had established before its coordinator stopped;
    /// describes where it resumes.
    pub fn restore(&mut self, resume: &Resume) -> String {
        if let Some(i) = &resume.ingest {
            self.ingest.restore(i);
        }
        let Some(p) = &resume.progress else {
            return "from the start".into();
        };
        self.als.checkpoint = p.als_checkpoint;
        self.als.losses = p.als_losses.clone();
        self.als.seconds = p.als_seconds.clone();
        let kmeans_usable = kmeans_resumable(p);
        if p.init_done && kmeans_usable {
            self.init = Some(kmeans::Init {
                candidates: p.init_centroids.clone(),
                weights: p.init_weights.clone(),
                count: p.init_candidates as usize,
            });
        }
        self.lloyd = if !kmeans_usable {
            kmeans::Lloyd::default()
        } else {
            Self::restored_lloyd(p)
        };
        let last = self.lloyd.fits.iter().rfind(|f| f.rounds > 0);
        if let Some(f) = last {
            format!("from Lloyd round {} (k = {})", f.rounds + 1, f.k)
        } else if self.init.is_some() {
            "from the Lloyd rounds".into()
        } else if p.als_checkpoint > 0 {
            format!("from the ALS checkpoint of iteration {}", p.als_checkpoint)
        } else if resume.ingest.is_some() {
            "after ingest".into()
        } else {
            "from the start".into()
        }
    }

    /// The Lloyd fits a stored progress holds.
    fn restored_lloyd(p: &pb::StoredProgress) -> kmeans::Lloyd {
        kmeans::Lloyd {
            fits: p
                .fits
                .iter()
                .map(|f| kmeans::Fit {
                    k: f.k as usize,
                    start: f.start,
                    rounds: f.rounds,
                    centroids: f.centroids.clone(),
                    inertia: f.inertia.clone(),
                    reseeds: f.reseeds as usize,
                    converged: f.converged,
                })
                .collect(),
            group: p.fit_group as usize,
            done: p.lloyd_done,
        }
    }

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
            chosen: None,
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

    pub fn chosen(&self) -> &kmeans::Chosen {
        self.chosen
            .as_ref()
            .expect("k-means chooses before this phase")
    }
}

/// Whether stored k-means progress can be resumed: progress of an older
/// coordinator (candidates without weights, finished rounds without fits) cannot,
/// and k-means starts over from its initialisation.
fn kmeans_resumable(p: &pb::StoredProgress) -> bool {
    p.init_weights.len() as u64 == p.init_candidates && (!p.lloyd_done || !p.fits.is_empty())
}

/// Runs the phases from where the job is: each skips what is already done.
pub(super) async fn advance(
    d: &mut Driver<'_>,
    facts: &mut Facts,
    committing: &AtomicBool,
) -> Result<(), CoordinatorError> {
    if facts.ingested.is_none() {
        ingest::run(d, facts).await?;
        d.save(facts);
    }
    if let Some(previous) = &facts.plan.previous {
        // the features are known once ingest has found the extra table's columns
        let mut names = d.ctx.spec.feature_names();
        names.extend(crate::extra::feature_names(&facts.ingested().extra_columns));
        previous.check_features(&names)?;
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
            d.save(facts);
        }
        if !facts.lloyd.done {
            kmeans::lloyd(d, facts).await?;
        }
        if facts.chosen.is_none() {
            facts.chosen = Some(kmeans::choose(d, facts).await?);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmeans_progress_of_an_older_coordinator_is_not_resumed() {
        // an older record: the k initial centroids in init_centroids, no weights
        let older = pb::StoredProgress {
            init_done: true,
            init_centroids: vec![0.0; 12],
            init_candidates: 61,
            lloyd_done: true,
            ..Default::default()
        };
        assert!(!kmeans_resumable(&older));
        let current = pb::StoredProgress {
            init_done: true,
            init_centroids: vec![0.0; 6],
            init_candidates: 3,
            init_weights: vec![1.0, 2.0, 3.0],
            fits: vec![pb::StoredFit::default()],
            lloyd_done: true,
            ..Default::default()
        };
        assert!(kmeans_resumable(&current));
        assert!(
            kmeans_resumable(&pb::StoredProgress::default()),
            "nothing yet"
        );
    }
}
