//! `report.json`: what a job did and found, for the people who run it and the
//! page (`report.html`) drawn from it.

use super::{Job, PhaseTimes, SegmentSummary, Summary, rfc3339};
use crate::rows::RowTally;
use serde::Serialize;
use shoal_proto::pb;
use shoal_spec::rfm::{self, Scoring};
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct KmeansFacts {
    pub k: usize,
    pub iterations: u32,
    pub converged: bool,
    /// Sum of squared distances of users to their segment's centroid (scaled space).
    pub inertia: f64,
    pub inertia_per_iteration: Vec<f64>,
    /// Seeded starts of k fitted side by side, the one kept (lowest inertia),
    /// and every start's final inertia.
    pub starts: u32,
    pub chosen_start: u32,
    pub start_inertia: Vec<f64>,
    pub candidates: usize,
    pub init_rounds: u32,
    pub reseeded_clusters: usize,
}

/// What the ALS phase did.
#[derive(Debug, Clone, Serialize)]
pub struct AlsFacts {
    pub factors: u32,
    pub iterations: u32,
    pub users: u64,
    pub items: u64,
    /// Distinct (user, item) pairs trained on.
    pub pairs: u64,
    /// Pairs held out for evaluation (`evaluate.holdout`).
    pub held_out_pairs: u64,
    /// Pairs dropped because their summed strength is not positive.
    pub nonpositive_pairs: u64,
    /// The Hu–Koren–Volinsky objective after each iteration (data term over every
    /// user × item cell plus λ(‖X‖² + ‖Y‖²)), divided by the sum of the
    /// confidences over the cells (Σc over pairs + users·items − pairs).
    pub loss_per_iteration: Vec<f64>,
    /// Wall-clock seconds of each iteration (both half-steps, Gram reductions
    /// and factor transfers included).
    pub seconds_per_iteration: Vec<f64>,
    /// Ranking quality on the held-out pairs (`evaluate.holdout > 0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<Evaluation>,
    /// Fold-in: the model scored against (no training: `iterations` is 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelFacts>,
    /// `recommend.users`: the list recommended to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recommend_users: Option<AudienceFacts>,
}

/// The customers a job recommended to (`recommend.users`).
#[derive(Debug, Clone, Serialize)]
pub struct AudienceFacts {
    pub source: String,
    /// Distinct ids in the list.
    pub requested: u64,
    /// Ids the job does not know (no interactions): no recommendations.
    pub unknown: u64,
}

/// The model a fold-in job scored against.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFacts {
    pub path: String,
    pub job_id: String,
    /// Pairs whose item the model does not know (left out of the users' solve).
    pub unknown_item_pairs: u64,
}

/// Ranking quality at `k` on held-out pairs, as implicit's
/// `ranking_metrics_at_k` computes it (training items excluded from the ranking).
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub k: u32,
    /// Users with at least one held-out item.
    pub users: u64,
    pub precision_at_k: f64,
    pub map_at_k: f64,
    pub ndcg_at_k: f64,
}

impl Evaluation {
    /// Merges the shards' partials (in shard order).
    pub fn from_partials<'a>(
        k: u32,
        parts: impl Iterator<Item = &'a pb::RankingPartial>,
    ) -> Option<Evaluation> {
        let mut t = pb::RankingPartial::default();
        for p in parts {
            t.users += p.users;
            t.hits += p.hits;
            t.relevant += p.relevant;
            t.average_precision += p.average_precision;
            t.ndcg += p.ndcg;
        }
        (t.users > 0).then(|| Evaluation {
            k,
            users: t.users,
            precision_at_k: t.hits as f64 / t.relevant.max(1) as f64,
            map_at_k: t.average_precision / t.users as f64,
            ndcg_at_k: t.ndcg / t.users as f64,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Quality {
    pub silhouette: Option<f64>,
    pub silhouette_sample: usize,
    pub davies_bouldin: Option<f64>,
    pub calinski_harabasz: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scaling {
    pub transform: String,
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub job_id: String,
    pub name: String,
    pub shoal_version: &'static str,
    pub spec: shoal_spec::JobSpec,
    pub rows: RowTally,
    pub users: u64,
    /// Recency is measured from this instant (latest event in the input), RFC 3339.
    pub reference_time: String,
    pub features: Vec<String>,
    pub scaling: Scaling,
    /// ALS, when the spec asks for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub als: Option<AlsFacts>,
    /// The `features.extra` table, when the spec names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra: Option<crate::extra::ExtraFacts>,
    pub kmeans: KmeansFacts,
    /// With several candidates of k (`segments.k` a range or list): every
    /// candidate's figures, the rule and the chosen k.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k_choice: Option<crate::kchoice::KChoiceFacts>,
    /// With `segments.previous`: customers from each earlier segment id to each
    /// of this run's, and each centroid's drift.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::previous::Migration>,
    /// RFM scores: the quintile cuts and customers per cell of the map.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rfm_scores: Option<RfmFacts>,
    pub quality: Quality,
    pub segments: Vec<SegmentSummary>,
    pub workers: usize,
    pub shards: u32,
    /// Seconds per phase, and `total`.
    pub seconds: BTreeMap<String, f64>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: Job<'_>,
        rows: &RowTally,
        users: u64,
        features: &[String],
        mean: &[f64],
        scale: &[f64],
        kmeans: KmeansFacts,
        summary: &Summary,
        times: PhaseTimes,
        started: Instant,
        workers: usize,
        reference_ms: i64,
    ) -> Report {
        let mut seconds: BTreeMap<String, f64> = times.0.into_iter().collect();
        seconds.insert("total".into(), started.elapsed().as_secs_f64());
        let reference_time = rfc3339(reference_ms);
        debug_assert_eq!(features.len(), mean.len());
        let extra = ctx.spec.features.extra().is_some();
        Report {
            job_id: ctx.id.to_string(),
            name: ctx.spec.name.clone(),
            shoal_version: env!("CARGO_PKG_VERSION"),
            spec: ctx.spec.clone(),
            rows: rows.clone(),
            users,
            reference_time,
            features: features.to_vec(),
            scaling: Scaling {
                transform: transform(ctx.spec, extra),
                mean: mean.to_vec(),
                scale: scale.to_vec(),
            },
            als: None,
            extra: None,
            kmeans,
            k_choice: None,
            migration: None,
            rfm_scores: None,
            quality: Quality {
                silhouette: summary.silhouette,
                silhouette_sample: summary.silhouette_sample,
                davies_bouldin: summary.davies_bouldin,
                calinski_harabasz: summary.calinski_harabasz,
            },
            segments: summary.segments.clone(),
            workers,
            shards: ctx.spec.cluster.shards,
            seconds,
        }
    }
}

/// How the feature blocks of `spec` are scaled, in words.
fn transform(spec: &shoal_spec::JobSpec, extra: bool) -> String {
    let f = &spec.features;
    let blocks = [
        f.als.then_some(
            "als_*: L2-normalised user factors times features.als_weight (mean 0, scale 1 here)",
        ),
        f.rfm.then_some("RFM: log1p, then (x - mean) / scale"),
        extra.then_some(
            "features.extra: (x - mean) / scale times features.extra_weight, 0 where missing",
        ),
    ];
    blocks.into_iter().flatten().collect::<Vec<_>>().join("; ")
}

/// How customers were scored and where they fell on the RFM map.
#[derive(Debug, Clone, Serialize)]
pub struct RfmFacts {
    /// The cuts between quintiles, as keys (`shoal_spec::rfm`: recency minus
    /// whole days, frequency orders, monetary 1% log buckets) and tie-break shares.
    pub quintiles: Scoring,
    /// The same cuts in the metrics' units: where scores 2, 3, 4 and 5 begin
    /// (recency: at most so many days; frequency: at least so many orders;
    /// monetary: at least so much). Customers with exactly a cut's value are split
    /// between the two scores by the tie-break.
    pub thresholds: BTreeMap<&'static str, Vec<f64>>,
    /// The 25 cells of the map, R from 5 down, F from 1 up.
    pub cells: Vec<RfmCell>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RfmCell {
    pub r: u8,
    pub f: u8,
    pub name: &'static str,
    pub customers: u64,
    /// Customers per segment, in segment order.
    pub per_segment: Vec<u64>,
}

impl RfmFacts {
    /// From the quintiles and the segments' customers per cell (`grid[segment]`,
    /// 25 cells by `rfm::cell_index`).
    pub fn new(quintiles: &Scoring, grid: &[Vec<u64>]) -> RfmFacts {
        let cells = (1..=5u8)
            .rev()
            .flat_map(|r| (1..=5u8).map(move |f| (r, f)))
            .map(|(r, f)| {
                let i = rfm::cell_index(r, f);
                let per_segment: Vec<u64> = grid
                    .iter()
                    .map(|g| g.get(i).copied().unwrap_or(0))
                    .collect();
                RfmCell {
                    r,
                    f,
                    name: rfm::cell_name(r, f).as_str(),
                    customers: per_segment.iter().sum(),
                    per_segment,
                }
            })
            .collect();
        let metrics = [
            &quintiles.recency,
            &quintiles.frequency,
            &quintiles.monetary,
        ];
        let thresholds = metrics
            .iter()
            .enumerate()
            .filter_map(|(m, q)| {
                let q = q.as_ref()?;
                let name = ["recency_days", "frequency", "monetary"][m];
                Some((
                    name,
                    q.cuts.iter().map(|c| rfm::key_value(m, c.key)).collect(),
                ))
            })
            .collect();
        RfmFacts {
            quintiles: quintiles.clone(),
            thresholds,
            cells,
        }
    }
}
