//! The segments' figures, merged from the workers' finalize answers in shard
//! order: sizes, RFM summaries, names, top items and the clustering metrics.

use crate::CoordinatorError;
use crate::kmeans;
use crate::output::Quality;
use serde::Serialize;
use shoal_proto::pb;
use shoal_proto::sketch::Sketch;
use shoal_spec::rfm::{self, Scoring};
use std::collections::BTreeMap;

/// Per-segment figures merged from the workers.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentSummary {
    pub segment: u32,
    /// The name of the RFM map's cells that hold most of the segment's
    /// customers, and their share of it (absent when customers are not named).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_share: Option<f64>,
    pub size: u64,
    pub share: f64,
    /// The segment's monetary value (sum over its customers) and its share of
    /// every customer's.
    pub revenue: f64,
    pub revenue_share: f64,
    pub recency_days_mean: f64,
    pub recency_days_median: f64,
    pub frequency_mean: f64,
    pub frequency_median: f64,
    pub monetary_mean: f64,
    pub monetary_median: f64,
    /// Mean RFM quintile scores (1..=5) of the segment's customers; absent for
    /// a metric the job does not score.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r_score_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f_score_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub m_score_mean: Option<f64>,
    /// The centroid mapped back to original units (recency days, orders, money;
    /// absent without an RFM block).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub centroid_recency_days: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub centroid_frequency: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub centroid_monetary: Option<f64>,
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
    /// Customers per segment and R x F cell (25 per segment, by
    /// `rfm::cell_index`); `None` when customers are not named.
    pub grid: Option<Vec<Vec<u64>>>,
    /// The seeded sample of customers (smallest `hash(seed, user)`), in key order:
    /// their scaled features and segments.
    pub sample: Vec<pb::SamplePoint>,
}

/// Where the blocks of a job's feature vector are.
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    pub dims: usize,
    /// The first of the three RFM features (none: the job has no RFM block).
    pub rfm_at: Option<usize>,
    /// Every feature's name.
    pub names: &'a [String],
    /// A `features.extra` block: where it starts (it runs to the end) and its
    /// weight.
    pub extra_at: Option<(usize, f64)>,
}

/// The finalize answers added up per segment (in shard order).
struct Merged<'a> {
    count: Vec<u64>,
    rfm_sum: Vec<[f64; 3]>,
    sketches: Vec<[Sketch; 3]>,
    dist_sum: Vec<f64>,
    inertia: Vec<f64>,
    feat_sum: Vec<f64>,
    cold: Vec<u64>,
    /// Customers per R x F cell (25 per segment; empty when nobody is named).
    cells: Vec<u64>,
    score_sums: Vec<[u64; 3]>,
    sample: Vec<&'a pb::SamplePoint>,
}

impl<'a> Merged<'a> {
    fn new(finals: &'a [pb::ShardFinal], k: usize, dims: usize, named: bool) -> Merged<'a> {
        let mut m = Merged {
            count: vec![0; k],
            rfm_sum: vec![[0.0; 3]; k],
            sketches: vec![[Sketch::default(), Sketch::default(), Sketch::default()]; k],
            dist_sum: vec![0.0; k],
            inertia: vec![0.0; k],
            feat_sum: vec![0.0; k * dims],
            cold: vec![0; k],
            cells: vec![0; if named { k * 25 } else { 0 }],
            score_sums: vec![[0; 3]; k],
            sample: Vec::new(),
        };
        for f in finals {
            for (c, n) in f.cold_start.iter().enumerate().take(k) {
                m.cold[c] += n;
            }
            for (c, s) in f.segments.iter().enumerate().take(k) {
                m.count[c] += s.count;
                for j in 0..3 {
                    m.rfm_sum[c][j] += s.rfm_sum.get(j).copied().unwrap_or(0.0);
                    if let Some(sk) = s.rfm_sketch.get(j) {
                        m.sketches[c][j].merge(&Sketch::from_proto(sk));
                    }
                    m.score_sums[c][j] += s.score_sums.get(j).copied().unwrap_or(0);
                }
                if named {
                    for (cell, n) in s.rfm_cells.iter().enumerate().take(25) {
                        m.cells[c * 25 + cell] += n;
                    }
                }
                m.dist_sum[c] += s.distance_sum;
                m.inertia[c] += s.inertia;
                for (j, v) in s.feature_sum.iter().enumerate().take(dims) {
                    m.feat_sum[c * dims + j] += v;
                }
            }
            m.sample.extend(f.sample.iter());
        }
        m
    }
}

/// Merges the finalize answers (in shard order) into segment figures and metrics.
pub fn summarize(
    finals: &[pb::ShardFinal],
    centroids: &[f32],
    layout: Layout<'_>,
    k: usize,
    (mean, scale): (&[f64], &[f64]),
    scoring: &Scoring,
    sample_size: usize,
) -> Summary {
    let dims = layout.dims;
    let mut m = Merged::new(finals, k, dims, scoring.names());
    let users: u64 = m.count.iter().sum();
    let revenue: f64 = m.rfm_sum.iter().map(|s| s[2]).sum();
    let rfm = layout.rfm_at;
    let original = |c: usize, j: usize| {
        let j = rfm? + j;
        let y = f64::from(centroids[c * dims + j]) * scale[j] + mean[j];
        // features are log1p (sign-preserving for money): undo it
        Some(y.signum() * y.abs().exp_m1())
    };
    // A segment's mean of an extra feature: its members' mean in the scaled
    // space, mapped back.
    let extra_means = |c: usize| -> BTreeMap<String, f64> {
        let Some((at, weight)) = layout.extra_at.filter(|&(_, w)| w > 0.0) else {
            return BTreeMap::new();
        };
        (at..dims)
            .map(|j| {
                let scaled = m.feat_sum[c * dims + j] / m.count[c].max(1) as f64;
                (
                    layout.names[j].clone(),
                    scaled / weight * scale[j] + mean[j],
                )
            })
            .collect()
    };
    let share = |x: f64, of: f64| if of > 0.0 { x / of } else { 0.0 };
    let segments = (0..k)
        .map(|c| {
            let n = m.count[c].max(1) as f64;
            let med = |j: usize| m.sketches[c][j].quantile(0.5).unwrap_or(0.0);
            let named = (!m.cells.is_empty())
                .then(|| rfm::group_name(&m.cells[c * 25..(c + 1) * 25]))
                .flatten();
            let score_mean = |j: usize, q: &Option<rfm::Quintiles>| {
                q.as_ref()
                    .filter(|_| m.count[c] > 0)
                    .map(|_| m.score_sums[c][j] as f64 / n)
            };
            SegmentSummary {
                segment: c as u32,
                name: named.map(|(name, _)| name.as_str().to_string()),
                name_share: named.map(|(_, s)| s),
                size: m.count[c],
                share: share(m.count[c] as f64, users as f64),
                revenue: m.rfm_sum[c][2],
                revenue_share: share(m.rfm_sum[c][2], revenue),
                recency_days_mean: m.rfm_sum[c][0] / n,
                recency_days_median: med(0),
                frequency_mean: m.rfm_sum[c][1] / n,
                frequency_median: med(1),
                monetary_mean: m.rfm_sum[c][2] / n,
                monetary_median: med(2),
                r_score_mean: score_mean(0, &scoring.recency),
                f_score_mean: score_mean(1, &scoring.frequency),
                m_score_mean: score_mean(2, &scoring.monetary),
                centroid_recency_days: original(c, 0),
                centroid_frequency: original(c, 1),
                centroid_monetary: original(c, 2),
                top_items: Vec::new(),
                extra_means: extra_means(c),
                cold_start_users: m.cold[c],
            }
        })
        .collect::<Vec<SegmentSummary>>();
    let metrics = metrics(&mut m, centroids, dims, k, sample_size);
    Summary {
        segments,
        inertia: m.inertia.iter().sum(),
        silhouette: metrics.silhouette,
        silhouette_sample: metrics.silhouette_sample,
        davies_bouldin: metrics.davies_bouldin,
        calinski_harabasz: metrics.calinski_harabasz,
        grid: (!m.cells.is_empty()).then(|| m.cells.chunks(25).map(|c| c.to_vec()).collect()),
        sample: m.sample.iter().map(|&p| p.clone()).collect(),
    }
}

/// The clustering metrics of the merged answers; keeps the global sample (the
/// `sample_size` smallest keys) in `m.sample`.
fn metrics(
    m: &mut Merged<'_>,
    centroids: &[f32],
    dims: usize,
    k: usize,
    sample_size: usize,
) -> Quality {
    let count = &m.count;
    // Cluster member means for Calinski–Harabasz; the within-cluster sum of
    // squares around the means follows from the one around the centroids.
    let means: Vec<f64> = (0..k * dims)
        .map(|i| {
            let c = i / dims;
            if count[c] > 0 {
                m.feat_sum[i] / count[c] as f64
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
            m.inertia[c] - count[c] as f64 * off
        })
        .sum();
    let scatter: Vec<f64> = (0..k)
        .map(|c| {
            if count[c] > 0 {
                m.dist_sum[c] / count[c] as f64
            } else {
                0.0
            }
        })
        .collect();
    m.sample.sort_by_key(|s| s.key);
    m.sample.truncate(sample_size);
    let pts: Vec<f32> = m
        .sample
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .collect();
    let labels: Vec<u32> = m.sample.iter().map(|s| s.label).collect();
    Quality {
        silhouette: kmeans::silhouette(&pts, dims, &labels, k),
        silhouette_sample: m.sample.len(),
        davies_bouldin: kmeans::davies_bouldin(centroids, dims, &scatter, count),
        calinski_harabasz: kmeans::calinski_harabasz(&means, dims, count, within.max(0.0)),
    }
}
