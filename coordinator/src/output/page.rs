//! `report.html`: the page a marketer reads, drawn by `shoal_report` from the
//! job's report and the segments' summary (the sample of customers for the map).

use super::{Report, Summary};
use crate::pca;
use shoal_report::{
    GridCell, ItemView, KChoice, KRow, MapView, Migration, Page, Rfm, ScoreRow, SegmentView,
};

/// Customers drawn on the map: the first of the seeded sample (smallest
/// `hash(seed, user)`), so the same customers every run.
const MAP_POINTS: usize = 2_000;

/// The page of a finished job.
pub fn page(report: &Report, summary: &Summary) -> Page {
    let money =
        report.spec.input.columns.price().is_some() || report.spec.input.columns.amount().is_some();
    let rfm = report.spec.features.rfm || report.rfm_scores.is_some();
    let segments: Vec<SegmentView> = report
        .segments
        .iter()
        .map(|s| SegmentView {
            id: s.segment,
            name: s.name.clone(),
            name_share: s.name_share.unwrap_or(0.0),
            size: s.size,
            share: s.share,
            revenue: money.then_some(s.revenue),
            revenue_share: money.then_some(s.revenue_share),
            rfm: rfm.then_some(Rfm {
                recency_days: s.recency_days_mean,
                frequency: s.frequency_mean,
                monetary: s.monetary_mean,
            }),
            top_items: s
                .top_items
                .iter()
                .map(|t| ItemView {
                    id: t.item_id.clone(),
                    label: t.label.clone(),
                    share: t.share,
                    lift: t.lift,
                })
                .collect(),
        })
        .collect();
    let users: u64 = report.segments.iter().map(|s| s.size).sum();
    let mean = |f: fn(&super::SegmentSummary) -> f64| {
        report
            .segments
            .iter()
            .map(|s| f(s) * s.size as f64)
            .sum::<f64>()
            / users.max(1) as f64
    };
    Page {
        title: report.name.clone(),
        job_id: report.job_id.clone(),
        reference_time: report.reference_time.clone(),
        facts: facts(report),
        dropped: report
            .rows
            .dropped
            .iter()
            .map(|(r, n)| (r.clone(), *n))
            .collect(),
        seconds: seconds(report),
        segments,
        population: rfm.then(|| Rfm {
            recency_days: mean(|s| s.recency_days_mean),
            frequency: mean(|s| s.frequency_mean),
            monetary: mean(|s| s.monetary_mean),
        }),
        grid: report.rfm_scores.as_ref().map(|r| {
            r.cells
                .iter()
                .map(|c| GridCell {
                    r: c.r,
                    f: c.f,
                    name: c.name.to_string(),
                    counts: c.per_segment.clone(),
                })
                .collect()
        }),
        map: map(summary, users),
        als_loss: report
            .als
            .as_ref()
            .map(|a| a.loss_per_iteration.clone())
            .unwrap_or_default(),
        inertia: report.kmeans.inertia_per_iteration.clone(),
        quality: quality(report),
        migration: report.migration.as_ref().map(|m| Migration {
            from: m.from.clone(),
            to: m.to.clone(),
            counts: m.counts.clone(),
            drift: m.drift.iter().map(|d| (d.segment, d.distance)).collect(),
            previous: m.previous.clone(),
        }),
        scores: report.rfm_scores.as_ref().map(score_rows).unwrap_or_default(),
        k_choice: report.k_choice.as_ref().map(|c| KChoice {
            rows: c
                .candidates
                .iter()
                .map(|m| KRow {
                    k: m.k,
                    inertia: m.inertia,
                    silhouette: m.silhouette,
                    davies_bouldin: m.davies_bouldin,
                    calinski_harabasz: m.calinski_harabasz,
                    stability: m.stability,
                })
                .collect(),
            chosen: c.chosen,
            rule: format!(
                "{} (silhouette, Davies–Bouldin and Calinski–Harabasz on a seeded sample of {} customers; stability: mean adjusted Rand index of k-means refits on {} pairs of half-samples)",
                c.rule, c.sample, c.stability_pairs
            ),
        }),
    }
}

/// What each RFM score means, from the cuts in the metrics' units.
fn score_rows(rfm: &super::RfmFacts) -> Vec<ScoreRow> {
    let row = |name: &str, metric: &str, band: &dyn Fn(f64, f64) -> String| {
        let t = rfm.thresholds.get(name)?;
        let mut bands = vec![String::new(); 5];
        for (score, b) in bands.iter_mut().enumerate() {
            let lower = if score == 0 { f64::NAN } else { t[score - 1] };
            let upper = t.get(score).copied().unwrap_or(f64::NAN);
            *b = band(lower, upper);
        }
        Some(ScoreRow {
            metric: metric.to_string(),
            bands,
        })
    };
    let days = |from: f64, to: f64| match (from.is_nan(), to.is_nan()) {
        // recency falls as the score rises: `from` is the larger number of days
        (true, _) => format!("{to:.0}+ days"),
        (_, true) => format!("0–{from:.0} days"),
        _ => format!("{to:.0}–{from:.0} days"),
    };
    let orders = |from: f64, to: f64| match (from.is_nan(), to.is_nan()) {
        (true, _) => format!("up to {to:.0}"),
        (_, true) => format!("{from:.0}+"),
        _ => format!("{from:.0}–{to:.0}"),
    };
    let money = |from: f64, to: f64| match (from.is_nan(), to.is_nan()) {
        (true, _) => format!("up to {to:.2}"),
        (_, true) => format!("{from:.2}+"),
        _ => format!("{from:.2}–{to:.2}"),
    };
    [
        row(
            "recency_days",
            "Recency (R): days since the last order",
            &days,
        ),
        row("frequency", "Frequency (F): orders", &orders),
        row("monetary", "Monetary (M): money spent", &money),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The sample of customers on their first two principal components.
fn map(summary: &Summary, users: u64) -> Option<MapView> {
    let dims = summary.sample.first()?.values.len();
    let values: Vec<f32> = summary
        .sample
        .iter()
        .flat_map(|p| p.values.iter().copied())
        .collect();
    let projection = pca::project2(&values, dims)?;
    Some(MapView {
        points: projection
            .points
            .iter()
            .zip(&summary.sample)
            .take(MAP_POINTS)
            .map(|(xy, p)| (xy[0], xy[1], p.label))
            .collect(),
        explained: projection.explained,
        sampled_from: users,
    })
}

fn facts(r: &Report) -> Vec<(String, String)> {
    let spec = &r.spec;
    let mut f = vec![
        ("Input".to_string(), spec.input.interactions.clone()),
        ("Rows read".into(), r.rows.read.to_string()),
        ("Rows kept".into(), r.rows.kept.to_string()),
        ("Customers".into(), r.users.to_string()),
        ("Segments (k)".into(), r.kmeans.k.to_string()),
        ("Features".into(), feature_blocks(r)),
        (
            "k-means".into(),
            format!(
                "{} rounds, {}",
                r.kmeans.iterations,
                if r.kmeans.converged {
                    "converged"
                } else {
                    "stopped at segments.max_iter"
                }
            ),
        ),
    ];
    if let Some(als) = &r.als {
        f.push((
            "ALS".into(),
            format!(
                "{} factors, {} iterations, {} items, {} pairs",
                als.factors, als.iterations, als.items, als.pairs
            ),
        ));
    }
    f.extend([
        ("Workers".into(), r.workers.to_string()),
        ("Shards".into(), r.shards.to_string()),
        ("Device".into(), spec.cluster.device.as_str().to_string()),
        ("shoal version".into(), r.shoal_version.to_string()),
    ]);
    f
}

/// The feature blocks segmented on, in words.
fn feature_blocks(r: &Report) -> String {
    let spec = &r.spec.features;
    let mut blocks = Vec::new();
    if spec.als {
        blocks.push(format!("ALS factors (weight {})", spec.als_weight));
    }
    if spec.rfm {
        blocks.push("recency, frequency, monetary (log)".to_string());
    }
    if let Some(extra) = spec.extra() {
        blocks.push(format!("{extra} (weight {})", spec.extra_weight));
    }
    blocks.join("; ")
}

/// Seconds per phase in the order the phases run, then the total.
fn seconds(r: &Report) -> Vec<(String, f64)> {
    const ORDER: [&str; 11] = [
        "plan", "ingest", "load", "als", "scale", "init", "lloyd", "choose", "finalize", "write",
        "total",
    ];
    let mut out: Vec<(String, f64)> = ORDER
        .iter()
        .filter_map(|p| r.seconds.get(*p).map(|s| (p.to_string(), *s)))
        .collect();
    out.extend(
        r.seconds
            .iter()
            .filter(|(p, _)| !ORDER.contains(&p.as_str()))
            .map(|(p, s)| (p.clone(), *s)),
    );
    out
}

fn quality(r: &Report) -> Vec<(String, String)> {
    let q = &r.quality;
    let num =
        |x: Option<f64>, digits: usize| x.map_or("n/a".to_string(), |v| format!("{v:.digits$}"));
    let mut out = vec![
        (
            format!("Silhouette (sample of {})", q.silhouette_sample),
            num(q.silhouette, 3),
        ),
        ("Davies–Bouldin".into(), num(q.davies_bouldin, 3)),
        ("Calinski–Harabasz".into(), num(q.calinski_harabasz, 1)),
        ("Inertia".into(), format!("{:.1}", r.kmeans.inertia)),
    ];
    if let Some(e) = r.als.as_ref().and_then(|a| a.evaluation.as_ref()) {
        out.push((
            format!("Recommendations: precision at {}", e.k),
            format!("{:.4}", e.precision_at_k),
        ));
        out.push((format!("MAP at {}", e.k), format!("{:.4}", e.map_at_k)));
        out.push((format!("nDCG at {}", e.k), format!("{:.4}", e.ndcg_at_k)));
    }
    out
}
