//! Job-level outputs the coordinator writes: `segments.parquet`,
//! `centroids.parquet`, `segment_items.parquet` (with ALS), `report.json`, and last
//! of all the `_SUCCESS` manifest.

use crate::CoordinatorError;
use crate::kmeans;
use arrow::array::{
    Array, ArrayRef, Float32Builder, Float64Array, ListBuilder, StringArray, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use serde::Serialize;
use shoal_proto::pb;
use shoal_proto::sketch::Sketch;
use shoal_spec::manifest::{FileEntry, InputEntry, MANIFEST, MANIFEST_VERSION, Manifest};
use shoal_store::{self as store, InputObject, Location};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// Files a job writes at the top of its output folder (besides the manifest).
const JOB_FILES: [&str; 4] = [
    "segments.parquet",
    "centroids.parquet",
    "report.json",
    "segment_items.parquet",
];
/// Tables written as a folder of per-shard parts.
const PART_TABLES: [&str; 4] = [
    ASSIGNMENTS,
    "user_factors.parquet",
    "item_factors.parquet",
    "recommendations.parquet",
];
const ASSIGNMENTS: &str = "assignments.parquet";

/// Removes the manifest first, then the outputs of an earlier run, so the folder
/// never looks complete while a job writes into it. Other objects are left alone.
pub async fn clear_previous(output: &Location) -> Result<(), CoordinatorError> {
    output.child(MANIFEST).delete().await?;
    for f in JOB_FILES {
        output.child(f).delete().await?;
    }
    for t in PART_TABLES {
        output.child(t).delete_all().await?;
    }
    Ok(())
}

pub use crate::rows::RowTally;

/// Fails when the splits read one customer's id in two forms: some hold the user
/// column as numbers (ids read as integers, `17850`) while text ids of others
/// are integers written with a fraction (`17850.0`, which stays that text while
/// `input.user_as_integer` is false). Names the files of each form.
pub fn check_id_forms(
    results: &[pb::SplitResult],
    splits: &[pb::Split],
) -> Result<(), CoordinatorError> {
    let object = |r: &pb::SplitResult| {
        splits
            .iter()
            .find(|s| s.index == r.split)
            .map_or_else(|| format!("split {}", r.split), |s| s.object.clone())
    };
    let files = |pick: &dyn Fn(&pb::SplitResult) -> bool| {
        let mut names: Vec<String> = results.iter().filter(|r| pick(r)).map(object).collect();
        names.dedup();
        let more = names.len().saturating_sub(3);
        names.truncate(3);
        let mut text = names.join(", ");
        if more > 0 {
            text.push_str(&format!(" and {more} more"));
        }
        text
    };
    let fractional: u64 = results.iter().map(|r| r.fractional_integer_ids).sum();
    if fractional == 0 || !results.iter().any(|r| r.numeric_user_ids) {
        return Ok(());
    }
    Err(CoordinatorError::MixedIdForms {
        numeric: files(&|r| r.numeric_user_ids),
        fractional,
        text: files(&|r| r.fractional_integer_ids > 0),
        example: results
            .iter()
            .find(|r| r.fractional_integer_ids > 0)
            .map(|r| r.fractional_integer_example.clone())
            .unwrap_or_default(),
    })
}

/// Seconds spent per phase, in order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseTimes(pub Vec<(String, f64)>);

impl PhaseTimes {
    pub fn add(&mut self, phase: &str, since: Instant) {
        self.0
            .push((phase.to_string(), since.elapsed().as_secs_f64()));
    }
}

/// Per-segment figures merged from the workers.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentSummary {
    pub segment: u32,
    pub size: u64,
    pub share: f64,
    pub recency_days_mean: f64,
    pub recency_days_median: f64,
    pub frequency_mean: f64,
    pub frequency_median: f64,
    pub monetary_mean: f64,
    pub monetary_median: f64,
    /// The centroid mapped back to original units (recency days, orders, money).
    pub centroid_recency_days: f64,
    pub centroid_frequency: f64,
    pub centroid_monetary: f64,
    /// With ALS: the items most of the segment's users bought.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_items: Vec<TopItem>,
    /// With a `features.extra` table (and a weight above 0): the mean of each of
    /// its features over the segment's users, in the table's units (a user
    /// without a value counts at the feature's overall mean).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_means: BTreeMap<String, f64>,
    /// In a fold-in with a `features.extra` table: the users without
    /// interactions assigned to the segment from the table alone (not in `size`
    /// nor in the RFM figures).
    #[serde(skip_serializing_if = "is_zero")]
    pub cold_start_users: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Items listed per segment.
pub const TOP_ITEMS: usize = 10;

/// An item a segment's users buy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopItem {
    pub item_id: String,
    /// From the spec's `input.columns.item_label`, when it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Users of the segment who bought it.
    pub users: u64,
    /// `users` / the segment's size.
    pub share: f64,
    /// `share` / the share of all users who bought it.
    pub lift: f64,
}

/// The segments' item counts, merged over the workers: per segment and
/// catalogue item the users who bought it, and every item's id and label.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemCounts {
    /// `k x items`, row-major.
    pub users: Vec<u64>,
    pub ids: Vec<String>,
    pub labels: Vec<String>,
}

impl ItemCounts {
    /// From the workers' finalize answers: counts added (integers: in any
    /// order), names put in catalogue order (item shard, position).
    pub fn merge(
        answers: &[pb::FinalizeResponse],
        k: usize,
    ) -> Result<ItemCounts, CoordinatorError> {
        let mut shards: Vec<&pb::ItemShardIds> =
            answers.iter().flat_map(|a| a.item_ids.iter()).collect();
        shards.sort_by_key(|s| s.shard);
        // a fold-in's model catalogue comes from every worker: once is enough
        shards.dedup_by_key(|s| s.shard);
        let mut out = ItemCounts::default();
        for s in shards {
            out.ids.extend(s.ids.iter().cloned());
            out.labels.extend(s.labels.iter().cloned());
        }
        let items = out.ids.len();
        for a in answers.iter().filter(|a| !a.item_users.is_empty()) {
            if a.item_users.len() != k * items {
                return Err(CoordinatorError::Protocol {
                    worker: "(a worker)".into(),
                    step: "finalize",
                    detail: format!(
                        "{} segment item counts for {k} segments and {items} items",
                        a.item_users.len()
                    ),
                });
            }
            if out.users.is_empty() {
                out.users = vec![0; k * items];
            }
            for (t, v) in out.users.iter_mut().zip(&a.item_users) {
                *t += v;
            }
        }
        Ok(out)
    }
}

impl Summary {
    /// Gives every segment its top items (with ALS).
    pub fn add_top_items(&mut self, counts: &ItemCounts) {
        let sizes: Vec<u64> = self.segments.iter().map(|s| s.size).collect();
        for (s, top) in self.segments.iter_mut().zip(top_items(counts, &sizes)) {
            s.top_items = top;
        }
    }
}

/// Per segment, its [`TOP_ITEMS`] items by users (ties: item id), with share
/// and lift.
pub fn top_items(counts: &ItemCounts, sizes: &[u64]) -> Vec<Vec<TopItem>> {
    let k = sizes.len();
    let items = counts.ids.len();
    if counts.users.len() != k * items || items == 0 {
        return vec![Vec::new(); k];
    }
    let users: u64 = sizes.iter().sum();
    let overall: Vec<u64> = (0..items)
        .map(|i| (0..k).map(|c| counts.users[c * items + i]).sum())
        .collect();
    (0..k)
        .map(|c| {
            let row = &counts.users[c * items..(c + 1) * items];
            let mut list: Vec<usize> = (0..items).filter(|&i| row[i] > 0).collect();
            list.sort_by(|&a, &b| row[b].cmp(&row[a]).then(counts.ids[a].cmp(&counts.ids[b])));
            list.truncate(TOP_ITEMS);
            list.into_iter()
                .map(|i| {
                    let share = row[i] as f64 / sizes[c].max(1) as f64;
                    let base = overall[i] as f64 / users.max(1) as f64;
                    TopItem {
                        item_id: counts.ids[i].clone(),
                        label: Some(counts.labels[i].clone()).filter(|l| !l.is_empty()),
                        users: row[i],
                        share,
                        lift: if base > 0.0 { share / base } else { 0.0 },
                    }
                })
                .collect()
        })
        .collect()
}

pub struct Summary {
    pub segments: Vec<SegmentSummary>,
    pub inertia: f64,
    pub silhouette: Option<f64>,
    pub silhouette_sample: usize,
    pub davies_bouldin: Option<f64>,
    pub calinski_harabasz: Option<f64>,
}

/// Where the blocks of a job's feature vector are.
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    pub dims: usize,
    /// The first of the three RFM features.
    pub rfm_at: usize,
    /// Every feature's name.
    pub names: &'a [String],
    /// A `features.extra` block: where it starts (it runs to the end) and its
    /// weight.
    pub extra_at: Option<(usize, f64)>,
}

/// Merges the finalize answers (in shard order) into segment figures and metrics.
pub fn summarize(
    finals: &[pb::ShardFinal],
    centroids: &[f32],
    layout: Layout<'_>,
    k: usize,
    mean: &[f64],
    scale: &[f64],
    sample_size: usize,
) -> Summary {
    let dims = layout.dims;
    let mut count = vec![0u64; k];
    let mut rfm_sum = vec![[0.0f64; 3]; k];
    let mut sketches = vec![[Sketch::default(), Sketch::default(), Sketch::default()]; k];
    let mut dist_sum = vec![0.0f64; k];
    let mut inertia_c = vec![0.0f64; k];
    let mut feat_sum = vec![0.0f64; k * dims];
    let mut cold = vec![0u64; k];
    let mut sample: Vec<&pb::SamplePoint> = Vec::new();
    for f in finals {
        for (c, n) in f.cold_start.iter().enumerate().take(k) {
            cold[c] += n;
        }
        for (c, s) in f.segments.iter().enumerate().take(k) {
            count[c] += s.count;
            for j in 0..3 {
                rfm_sum[c][j] += s.rfm_sum.get(j).copied().unwrap_or(0.0);
                if let Some(sk) = s.rfm_sketch.get(j) {
                    sketches[c][j].merge(&Sketch::from_proto(sk));
                }
            }
            dist_sum[c] += s.distance_sum;
            inertia_c[c] += s.inertia;
            for (j, v) in s.feature_sum.iter().enumerate().take(dims) {
                feat_sum[c * dims + j] += v;
            }
        }
        sample.extend(f.sample.iter());
    }
    let users: u64 = count.iter().sum();
    let inertia: f64 = inertia_c.iter().sum();
    let rfm = layout.rfm_at;
    let original = |c: usize, j: usize| {
        let j = rfm + j;
        let y = f64::from(centroids[c * dims + j]) * scale[j] + mean[j];
        // features are log1p (sign-preserving for money): undo it
        y.signum() * y.abs().exp_m1()
    };
    // A segment's mean of an extra feature: its members' mean in the scaled
    // space, mapped back.
    let extra_means = |c: usize| -> BTreeMap<String, f64> {
        let Some((at, weight)) = layout.extra_at.filter(|&(_, w)| w > 0.0) else {
            return BTreeMap::new();
        };
        (at..dims)
            .map(|j| {
                let scaled = feat_sum[c * dims + j] / count[c].max(1) as f64;
                (
                    layout.names[j].clone(),
                    scaled / weight * scale[j] + mean[j],
                )
            })
            .collect()
    };
    let segments = (0..k)
        .map(|c| {
            let n = count[c].max(1) as f64;
            let med = |j: usize| sketches[c][j].quantile(0.5).unwrap_or(0.0);
            SegmentSummary {
                segment: c as u32,
                size: count[c],
                share: if users > 0 {
                    count[c] as f64 / users as f64
                } else {
                    0.0
                },
                recency_days_mean: rfm_sum[c][0] / n,
                recency_days_median: med(0),
                frequency_mean: rfm_sum[c][1] / n,
                frequency_median: med(1),
                monetary_mean: rfm_sum[c][2] / n,
                monetary_median: med(2),
                centroid_recency_days: original(c, 0),
                centroid_frequency: original(c, 1),
                centroid_monetary: original(c, 2),
                top_items: Vec::new(),
                extra_means: extra_means(c),
                cold_start_users: cold[c],
            }
        })
        .collect::<Vec<SegmentSummary>>();
    // Metrics. Cluster member means for Calinski–Harabasz; the within-cluster sum of
    // squares around the means follows from the one around the centroids.
    let means: Vec<f64> = (0..k * dims)
        .map(|i| {
            let c = i / dims;
            if count[c] > 0 {
                feat_sum[i] / count[c] as f64
            } else {
                0.0
            }
        })
        .collect();
    let within: f64 = (0..k)
        .map(|c| {
            let off: f64 = (0..dims)
                .map(|j| (means[c * dims + j] - f64::from(centroids[c * dims + j])).powi(2))
                .sum();
            inertia_c[c] - count[c] as f64 * off
        })
        .sum();
    let scatter: Vec<f64> = (0..k)
        .map(|c| {
            if count[c] > 0 {
                dist_sum[c] / count[c] as f64
            } else {
                0.0
            }
        })
        .collect();
    sample.sort_by_key(|s| s.key);
    sample.truncate(sample_size);
    let pts: Vec<f32> = sample
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .collect();
    let labels: Vec<u32> = sample.iter().map(|s| s.label).collect();
    Summary {
        segments,
        inertia,
        silhouette: kmeans::silhouette(&pts, dims, &labels, k),
        silhouette_sample: sample.len(),
        davies_bouldin: kmeans::davies_bouldin(centroids, dims, &scatter, &count),
        calinski_harabasz: kmeans::calinski_harabasz(&means, dims, &count, within.max(0.0)),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct KmeansFacts {
    pub k: usize,
    pub iterations: u32,
    pub converged: bool,
    /// Sum of squared distances of users to their segment's centroid (scaled space).
    pub inertia: f64,
    pub inertia_per_iteration: Vec<f64>,
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

/// Copies the model's `item_factors.parquet/` parts into `output`, returning them
/// as written files (for the manifest).
pub async fn copy_item_factors(
    model: &crate::model::Model,
    output: &Location,
) -> Result<Vec<pb::WrittenFile>, CoordinatorError> {
    let mut out = Vec::new();
    for f in &model.manifest.files {
        if !f.path.starts_with("item_factors.parquet/") {
            continue;
        }
        let bytes = model.folder.child(&f.path).get().await?;
        let len = bytes.len() as u64;
        output.child(&f.path).put(bytes).await?;
        out.push(pb::WrittenFile {
            path: f.path.clone(),
            rows: f.rows,
            bytes: len,
        });
    }
    Ok(out)
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
    pub transform: &'static str,
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
                transform: match (ctx.spec.features.als, extra) {
                    (true, false) => {
                        "als_*: L2-normalised user factors times features.als_weight (mean 0, scale 1 here); RFM: log1p, then (x - mean) / scale"
                    }
                    (true, true) => {
                        "als_*: L2-normalised user factors times features.als_weight (mean 0, scale 1 here); RFM: log1p, then (x - mean) / scale; features.extra: (x - mean) / scale times features.extra_weight, 0 where missing"
                    }
                    (false, false) => "log1p, then (x - mean) / scale",
                    (false, true) => {
                        "RFM: log1p, then (x - mean) / scale; features.extra: (x - mean) / scale times features.extra_weight, 0 where missing"
                    }
                },
                mean: mean.to_vec(),
                scale: scale.to_vec(),
            },
            als: None,
            extra: None,
            kmeans,
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

/// The job the outputs are of.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    pub id: &'a shoal_spec::JobId,
    pub spec: &'a shoal_spec::JobSpec,
}

/// Milliseconds since the epoch as RFC 3339 (UTC, millisecond precision).
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// `segment_items.parquet`: every segment's top items, one row per (segment, rank).
fn segment_items_batch(
    segments: &[SegmentSummary],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let rows: Vec<(u32, u32, &TopItem)> = segments
        .iter()
        .flat_map(|s| {
            s.top_items
                .iter()
                .enumerate()
                .map(move |(r, t)| (s.segment, r as u32 + 1, t))
        })
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("segment", DataType::UInt32, false),
        Field::new("rank", DataType::UInt32, false),
        Field::new("item_id", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("users", DataType::UInt64, false),
        Field::new("share", DataType::Float64, false),
        Field::new("lift", DataType::Float64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.2.item_id.as_str()),
        )),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.2.label.as_deref()),
        )),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.2.users),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.2.share),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.2.lift),
        )),
    ];
    RecordBatch::try_new(schema, columns)
}

fn segments_batch(segments: &[SegmentSummary]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let f64col = |f: fn(&SegmentSummary) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(segments.iter().map(f)))
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("segment", DataType::UInt32, false),
        Field::new("size", DataType::UInt64, false),
        Field::new("share", DataType::Float64, false),
        Field::new("recency_days_mean", DataType::Float64, false),
        Field::new("recency_days_median", DataType::Float64, false),
        Field::new("frequency_mean", DataType::Float64, false),
        Field::new("frequency_median", DataType::Float64, false),
        Field::new("monetary_mean", DataType::Float64, false),
        Field::new("monetary_median", DataType::Float64, false),
        Field::new("centroid_recency_days", DataType::Float64, false),
        Field::new("centroid_frequency", DataType::Float64, false),
        Field::new("centroid_monetary", DataType::Float64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from_iter_values(
                segments.iter().map(|s| s.segment),
            )),
            Arc::new(UInt64Array::from_iter_values(
                segments.iter().map(|s| s.size),
            )),
            f64col(|s| s.share),
            f64col(|s| s.recency_days_mean),
            f64col(|s| s.recency_days_median),
            f64col(|s| s.frequency_mean),
            f64col(|s| s.frequency_median),
            f64col(|s| s.monetary_mean),
            f64col(|s| s.monetary_median),
            f64col(|s| s.centroid_recency_days),
            f64col(|s| s.centroid_frequency),
            f64col(|s| s.centroid_monetary),
        ],
    )
}

fn centroids_batch(
    centroids: &[f32],
    dims: usize,
    sizes: &[u64],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let k = centroids.len() / dims;
    let mut list = ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new(
        "item",
        DataType::Float32,
        false,
    )));
    for c in centroids.chunks_exact(dims) {
        list.values().append_slice(c);
        list.append(true);
    }
    let list = list.finish();
    let schema = Arc::new(Schema::new(vec![
        Field::new("segment", DataType::UInt32, false),
        Field::new("size", DataType::UInt64, false),
        Field::new("centroid", list.data_type().clone(), false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from_iter_values(0..k as u32)),
            Arc::new(UInt64Array::from_iter_values(sizes.iter().copied())),
            Arc::new(list),
        ],
    )
}

fn write_err(file: &str, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Write {
        file: file.to_string(),
        reason: e.to_string(),
    }
}

async fn put_parquet(
    output: &Location,
    name: &str,
    batch: RecordBatch,
) -> Result<FileEntry, CoordinatorError> {
    let rows = batch.num_rows() as u64;
    let bytes = store::encode_parquet(batch.schema(), &[batch]).map_err(|e| write_err(name, e))?;
    let len = bytes.len() as u64;
    output.child(name).put(bytes.into()).await?;
    Ok(FileEntry {
        path: name.to_string(),
        rows,
        bytes: len,
    })
}

/// Checks (HEAD) that every file the manifest will list is in the store with the
/// size recorded for it.
async fn check_listed(output: &Location, files: &[FileEntry]) -> Result<(), CoordinatorError> {
    for f in files {
        match output.child(&f.path).head().await? {
            Some(m) if m.size == f.bytes => {}
            other => {
                return Err(write_err(
                    &output.child(&f.path).url(),
                    format!(
                        "{} bytes were written, the store has {}; the output is incomplete and has no {MANIFEST}",
                        f.bytes,
                        other.map_or("no such object".to_string(), |m| format!(
                            "{} bytes",
                            m.size
                        ))
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Writes the job-level files, checks (HEAD) that every file to be listed, the
/// workers' and its own, exists with its size, and writes the manifest last.
#[allow(clippy::too_many_arguments)]
pub async fn write_all(
    ctx: Job<'_>,
    output: &Location,
    inputs: &[InputObject],
    finals: &[pb::ShardFinal],
    item_files: &[pb::WrittenFile],
    summary: &Summary,
    centroids: &[f32],
    dims: usize,
    report: Report,
) -> Result<(), CoordinatorError> {
    let mut files: Vec<FileEntry> = finals
        .iter()
        .flat_map(|f| f.file.iter().chain(&f.files))
        .chain(item_files)
        .map(|w| FileEntry {
            path: w.path.clone(),
            rows: w.rows,
            bytes: w.bytes,
        })
        .collect();
    let sizes: Vec<u64> = summary.segments.iter().map(|s| s.size).collect();
    files.push(
        put_parquet(
            output,
            "segments.parquet",
            segments_batch(&summary.segments).map_err(|e| write_err("segments.parquet", e))?,
        )
        .await?,
    );
    if ctx.spec.features.als {
        files.push(
            put_parquet(
                output,
                "segment_items.parquet",
                segment_items_batch(&summary.segments)
                    .map_err(|e| write_err("segment_items.parquet", e))?,
            )
            .await?,
        );
    }
    files.push(
        put_parquet(
            output,
            "centroids.parquet",
            centroids_batch(centroids, dims, &sizes)
                .map_err(|e| write_err("centroids.parquet", e))?,
        )
        .await?,
    );
    let json = serde_json::to_vec_pretty(&report).map_err(|e| write_err("report.json", e))?;
    let len = json.len() as u64;
    output.child("report.json").put(json.into()).await?;
    files.push(FileEntry {
        path: "report.json".into(),
        rows: 1,
        bytes: len,
    });
    let input: Vec<InputEntry> = inputs
        .iter()
        .map(|i| InputEntry {
            url: i.url.clone(),
            size: i.size,
            e_tag: i.e_tag.clone(),
            last_modified_unix_ms: i.last_modified_ms,
        })
        .collect();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        job_id: ctx.id.to_string(),
        name: ctx.spec.name.clone(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        shoal_version: env!("CARGO_PKG_VERSION").to_string(),
        spec: ctx.spec.clone(),
        input_fingerprint: Manifest::fingerprint(&input),
        input,
        files,
    };
    check_listed(output, &manifest.files).await?;
    output
        .child(MANIFEST)
        .put(manifest.to_json().into_bytes().into())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        // 2011-12-09 12:50:00 UTC, the last event of the Online Retail log
        assert_eq!(rfc3339(1_323_435_000_000), "2011-12-09T12:50:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
    }

    #[test]
    fn an_id_read_as_a_number_and_as_text_with_a_fraction_is_refused() {
        let split = |index: u32, object: &str| pb::Split {
            index,
            object: object.into(),
            ..Default::default()
        };
        let splits = [split(0, "a.parquet"), split(1, "b.csv"), split(2, "c.csv")];
        let numeric = pb::SplitResult {
            split: 0,
            numeric_user_ids: true,
            ..Default::default()
        };
        let text = |split, n: u64| pb::SplitResult {
            split,
            fractional_integer_ids: n,
            fractional_integer_example: if n > 0 {
                "17850.0".into()
            } else {
                String::new()
            },
            ..Default::default()
        };
        // Either form alone is one customer per id.
        check_id_forms(&[numeric.clone(), text(1, 0)], &splits).unwrap();
        check_id_forms(&[text(1, 3), text(2, 1)], &splits).unwrap();
        let err = check_id_forms(&[numeric, text(1, 3), text(2, 1)], &splits)
            .unwrap_err()
            .to_string();
        for part in [
            "a.parquet",
            "b.csv, c.csv",
            "4 user ids",
            "`17850.0`",
            "user_as_integer",
        ] {
            assert!(err.contains(part), "{part}: {err}");
        }
    }
}
