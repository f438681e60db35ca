//! Ingest: the workers read the splits, clean the rows and stage them by shard.
//! A split is the unit: the splits of a worker that answered are done; those of
//! a worker that failed are read again, by the next attempt's workers (a split's
//! staged objects are named by split and chunk and hold the same rows whoever
//! writes them, so a split read twice is staged once). Then the job's checks on
//! what was read, and the placement of the shards by their staged sizes.

use super::Facts;
use super::plan::Planned;
use crate::CoordinatorError;
use crate::extra;
use crate::job::Phase;
use crate::job::driver::Driver;
use crate::job::placement::{self, MemoryModel, Sizes};
use crate::output::{self, RowTally};
use crate::state::Progress;
use shoal_proto::pb;
use shoal_spec::spec::RFM_DIMS;
use std::time::{Duration, Instant};
use tracing::info;

/// How often the workers' ingest counters are read for the job's progress.
const INGEST_POLL: Duration = Duration::from_millis(500);

/// The splits still to read, and the answers for those read.
pub struct Ingest {
    pending: Vec<pb::Split>,
    extra_pending: Vec<pb::Split>,
    results: Vec<pb::SplitResult>,
    extra_results: Vec<pb::ExtraSplitResult>,
    bytes_total: u64,
}

impl Ingest {
    /// Every split read, as the coordinator's state kept the answers.
    pub fn restore(&mut self, stored: &pb::StoredIngest) {
        self.pending.clear();
        self.extra_pending.clear();
        self.results = stored.splits.clone();
        self.extra_results = stored.extra_splits.clone();
    }

    pub fn new(plan: &Planned) -> Ingest {
        Ingest {
            pending: plan.splits.clone(),
            extra_pending: plan.extra_splits.clone(),
            results: Vec::new(),
            extra_results: Vec::new(),
            bytes_total: plan
                .splits
                .iter()
                .chain(&plan.extra_splits)
                .map(|s| s.size)
                .sum(),
        }
    }
}

/// What ingest established.
pub struct Ingested {
    pub rows: RowTally,
    /// The newest kept event: the reference time of recency.
    pub reference_ms: i64,
    pub extra_columns: Vec<pb::ExtraColumn>,
    pub extra_rows: RowTally,
    pub sizes: Sizes,
    /// The memory model, but for the crew's parallel loads.
    pub memory: MemoryModel,
}

pub async fn run(d: &mut Driver<'_>, facts: &mut Facts) -> Result<(), CoordinatorError> {
    let t = Instant::now();
    d.phase(Phase::Ingest);
    let job_ctx = d.job_context(facts);
    let ingest = &mut facts.ingest;
    d.progress(Progress {
        bytes_total: Some(ingest.bytes_total),
        bytes_read: Some(ingest.results.iter().map(|s| s.bytes_read).sum()),
        ..Default::default()
    });
    if !ingest.pending.is_empty() || !ingest.extra_pending.is_empty() {
        read(d, ingest, &job_ctx)
            .await
            .inspect_err(|_| d.times.add("ingest", t))?;
    }
    let mut split_results = std::mem::take(&mut ingest.results);
    let mut extra_results = std::mem::take(&mut ingest.extra_results);
    split_results.sort_by_key(|s| s.split);
    extra_results.sort_by_key(|s| s.split);
    let stored = pb::StoredIngest {
        splits: split_results.clone(),
        extra_splits: extra_results.clone(),
    };
    let ingested = check(d, &facts.plan, &split_results, &extra_results)?;
    if let Some(journal) = &d.ctx.state.config.journal {
        journal.ingest(&d.ctx.id, &stored);
    }
    facts.ingested = Some(ingested);
    d.times.add("ingest", t);
    Ok(())
}

/// Reads the pending splits, shared out among the crew. Every member's answer
/// is awaited (not only until the first failure): the splits of those that
/// answered are done.
async fn read(
    d: &Driver<'_>,
    ingest: &mut Ingest,
    job_ctx: &pb::JobContext,
) -> Result<(), CoordinatorError> {
    let members = d.crew.len();
    let share = |splits: &[pb::Split], m: usize| -> Vec<pb::Split> {
        splits
            .iter()
            .enumerate()
            .filter(|(i, _)| i % members == m)
            .map(|(_, s)| s.clone())
            .collect()
    };
    let per_member: Vec<(Vec<pb::Split>, Vec<pb::Split>)> = (0..members)
        .map(|m| (share(&ingest.pending, m), share(&ingest.extra_pending, m)))
        .collect();
    let calls = futures::future::join_all(d.crew.iter().enumerate().map(|(m, member)| {
        let req = pb::IngestRequest {
            job: Some(job_ctx.clone()),
            attempt: d.attempt.0,
            splits: per_member[m].0.clone(),
            extra_splits: per_member[m].1.clone(),
        };
        member.call(Phase::Ingest.as_str(), move |mut c| async move {
            c.ingest(req).await
        })
    }));
    let answers = tokio::select! {
        answers = calls => answers,
        never = watch(d, ingest.bytes_total) => match never {},
    };
    let mut failed = None;
    for (m, answer) in answers.into_iter().enumerate() {
        match answer {
            Ok(a) => {
                let (done, extra_done) = &per_member[m];
                ingest
                    .pending
                    .retain(|s| !done.iter().any(|x| x.index == s.index));
                ingest
                    .extra_pending
                    .retain(|s| !extra_done.iter().any(|x| x.index == s.index));
                ingest.results.extend(a.splits);
                ingest.extra_results.extend(a.extra_splits);
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// The job's checks on what was read; the shards' sizes and memory model.
fn check(
    d: &Driver<'_>,
    plan: &Planned,
    split_results: &[pb::SplitResult],
    extra_results: &[pb::ExtraSplitResult],
) -> Result<Ingested, CoordinatorError> {
    let spec = &d.ctx.spec;
    let rows = RowTally::from_splits(split_results);
    d.progress(Progress {
        rows_read: Some(rows.read),
        bytes_read: Some(split_results.iter().map(|s| s.bytes_read).sum()),
        phase_progress: Some(1.0),
        ..Default::default()
    });
    if rows.read == 0 {
        return Err(CoordinatorError::EmptyInput {
            pattern: spec.input.interactions.clone(),
            objects: plan.inputs.len(),
        });
    }
    output::check_id_forms(split_results, &plan.splits)?;
    if rows.kept == 0 {
        return Err(CoordinatorError::NothingKept {
            read: rows.read,
            dropped: rows.dropped_text(),
        });
    }
    let reference_ms = split_results
        .iter()
        .filter(|s| s.counts.as_ref().is_some_and(|c| c.kept > 0))
        .map(|s| s.max_time_ms)
        .max()
        .unwrap_or(0);
    info!(read = rows.read, kept = rows.kept, "ingested");
    // The extra table's columns, as its splits agree on them.
    let extra_columns = extra::agree(extra_results, |i| {
        plan.extra_splits
            .get(i as usize)
            .map_or_else(|| format!("split {i}"), |s| s.object.clone())
    })?;
    let extra_rows = extra::tally(extra_results);
    if spec.features.extra().is_some() && extra_rows.kept == 0 {
        return Err(CoordinatorError::ExtraTable {
            reason: format!(
                "no row of the table is usable: read {}, dropped {}",
                extra_rows.read,
                extra_rows.dropped_text()
            ),
        });
    }
    if let Some(model) = &plan.model {
        model.check_extra(&extra_columns)?;
    }
    let bytes_read = split_results
        .iter()
        .map(|s| s.bytes_read)
        .chain(extra_results.iter().map(|s| s.bytes_read))
        .sum();
    d.ctx
        .state
        .config
        .metrics
        .ingested(rows.read + extra_rows.read, bytes_read);
    let extra_dims = extra::dims(&extra_columns) as u64;
    let memory = MemoryModel {
        factors: if spec.features.als {
            u64::from(spec.als.factors)
        } else {
            0
        },
        dims: u64::from(spec.als.factors) * u64::from(spec.features.als)
            + RFM_DIMS as u64
            + extra_dims,
        extra: extra_dims,
        parallel_loads: 1,
    };
    Ok(Ingested {
        rows,
        reference_ms,
        extra_columns,
        extra_rows,
        sizes: Sizes::from_splits(split_results, d.shards),
        memory,
    })
}

/// Places the shards on the crew, where there is memory for them.
pub fn place(d: &mut Driver<'_>, facts: &Facts) -> Result<(), CoordinatorError> {
    let ingested = facts.ingested();
    let memory = MemoryModel {
        parallel_loads: d
            .crew
            .iter()
            .map(|m| u64::from(m.worker.threads))
            .max()
            .unwrap_or(1),
        ..ingested.memory
    };
    let limits: Vec<u64> = d.crew.iter().map(|m| m.worker.memory_limit).collect();
    let names: Vec<String> = d.crew.iter().map(|m| m.worker.id.to_string()).collect();
    d.placement = Some(placement::place(&ingested.sizes, &limits, &names, &memory)?);
    Ok(())
}

/// Reads the workers' ingest counters every [`INGEST_POLL`] and reports rows and
/// bytes read (and the share of the planned bytes) as the job's progress. Never
/// ends: it runs alongside the ingest step. Workers that do not answer in time
/// are left out of that round.
async fn watch(d: &Driver<'_>, bytes_total: u64) -> std::convert::Infallible {
    let mut last = (0u64, 0u64);
    loop {
        tokio::time::sleep(INGEST_POLL).await;
        let activity = futures::future::join_all(d.crew.iter().map(|m| {
            let mut c = m.client.clone();
            let req = pb::JobActivityRequest { job_id: d.job_id() };
            async move {
                match tokio::time::timeout(INGEST_POLL, c.get_job_activity(req)).await {
                    Ok(Ok(r)) => Some(r.into_inner()),
                    _ => None,
                }
            }
        }))
        .await;
        let rows: u64 = activity.iter().flatten().map(|a| a.rows_read).sum();
        let bytes: u64 = activity.iter().flatten().map(|a| a.bytes_read).sum();
        if (rows, bytes) != last {
            last = (rows, bytes);
            d.progress(Progress {
                rows_read: Some(rows),
                bytes_read: Some(bytes),
                phase_progress: (bytes_total > 0)
                    .then(|| (bytes as f64 / bytes_total as f64).min(1.0)),
                ..Default::default()
            });
        }
    }
}
