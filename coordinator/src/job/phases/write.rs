//! Write: the report and the job-level files, every file checked, and the
//! manifest (`_SUCCESS`) last. From here a cancellation lets the write finish.

use super::Facts;
use super::finalize::Finalized;
use super::kmeans::INIT_ROUNDS;
use crate::CoordinatorError;
use crate::extra;
use crate::job::Phase;
use crate::job::driver::Driver;
use crate::output::{self, Report};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tracing::info;

pub async fn run(
    d: &mut Driver<'_>,
    facts: &Facts,
    fin: Finalized,
    committing: &AtomicBool,
) -> Result<(), CoordinatorError> {
    let t = Instant::now();
    d.phase(Phase::Write);
    d.times.add("write", t);
    let ctx = d.ctx;
    let spec = &ctx.spec;
    ctx.state.config.metrics.phases(&d.times);
    let (ingested, loaded, scaled) = (facts.ingested(), facts.loaded(), facts.scaled());
    let kmeans = kmeans_facts(facts, fin.summary.inertia, fin.summary.segments.len());
    let mut report = Report::new(
        ctx.output_job(),
        &ingested.rows,
        loaded.users,
        &scaled.names,
        &scaled.mean,
        &scaled.scale,
        kmeans,
        &fin.summary,
        std::mem::take(&mut d.times),
        d.started,
        d.crew.len(),
        ingested.reference_ms,
    );
    report.extra = spec.features.extra().map(|table| {
        let mut facts = extra::ExtraFacts::new(
            table,
            &ingested.extra_columns,
            spec.features.extra_weight,
            ingested.extra_rows.clone(),
            &loaded.stats.values().cloned().collect::<Vec<_>>(),
        );
        if spec.model.is_some() {
            facts.cold_start_users = Some(
                fin.summary
                    .segments
                    .iter()
                    .map(|s| s.cold_start_users)
                    .sum(),
            );
        }
        facts
    });
    if loaded.scoring.names() {
        report.rfm_scores = fin
            .summary
            .grid
            .as_ref()
            .map(|grid| output::RfmFacts::new(&loaded.scoring, grid));
    }
    report.k_choice = facts.chosen.as_ref().and_then(|c| c.choice.clone());
    report.migration = fin.migration.clone();
    report.als = facts.als.facts.clone().map(|mut als| {
        als.recommend_users = fin.audience.clone();
        if spec.evaluate.holdout > 0.0 {
            als.evaluation = output::Evaluation::from_partials(
                spec.evaluate.k,
                fin.shards.iter().filter_map(|f| f.ranking.as_ref()),
            );
        }
        als
    });
    // From here a cancellation lets the write finish (see `job::run`).
    committing.store(true, Ordering::SeqCst);
    let output = &facts.plan.output;
    output::write_all(
        ctx.output_job(),
        output,
        &facts.plan.inputs,
        &fin.shards,
        &fin.item_files,
        &fin.summary,
        &fin.centroids,
        scaled.dims,
        report,
    )
    .await?;
    info!(output = %output.url(), seconds = d.started.elapsed().as_secs_f64(), "outputs written");
    Ok(())
}

/// The k-means figures of the report: the chosen fit's, or (a fold-in) none.
fn kmeans_facts(facts: &Facts, inertia: f64, segments: usize) -> output::KmeansFacts {
    match (&facts.plan.model, &facts.init, &facts.chosen) {
        (None, Some(init), Some(chosen)) => output::KmeansFacts {
            k: chosen.k,
            iterations: chosen.fit.inertia.len() as u32,
            converged: chosen.fit.converged,
            inertia,
            inertia_per_iteration: chosen.fit.inertia.clone(),
            candidates: init.count,
            init_rounds: INIT_ROUNDS,
            reseeded_clusters: chosen.fit.reseeds,
            starts: chosen.start_inertia.len() as u32,
            chosen_start: chosen.fit.start,
            start_inertia: chosen.start_inertia.clone(),
        },
        // a fold-in: the model's centroids, nothing fitted
        _ => output::KmeansFacts {
            k: segments,
            iterations: 0,
            converged: true,
            inertia,
            inertia_per_iteration: Vec::new(),
            candidates: 0,
            init_rounds: INIT_ROUNDS,
            reseeded_clusters: 0,
            starts: 0,
            chosen_start: 0,
            start_inertia: Vec::new(),
        },
    }
}
