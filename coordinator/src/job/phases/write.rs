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
    let lloyd = &facts.lloyd;
    let (candidates, iterations, converged) = match (&facts.plan.model, &facts.init) {
        (None, Some(init)) => (init.candidates, lloyd.inertia.len() as u32, lloyd.converged),
        _ => (0, 0, true),
    };
    let mut report = Report::new(
        ctx.output_job(),
        &ingested.rows,
        loaded.users,
        &scaled.names,
        &scaled.mean,
        &scaled.scale,
        output::KmeansFacts {
            k: loaded.k,
            iterations,
            converged,
            inertia: fin.summary.inertia,
            inertia_per_iteration: lloyd.inertia.clone(),
            candidates,
            init_rounds: INIT_ROUNDS,
            reseeded_clusters: lloyd.reseeds,
        },
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
