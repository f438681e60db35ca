//! The view model: everything the report shows, already computed. The report only
//! formats and draws these values; it computes nothing about the customers itself.

use serde::Serialize;

/// One report page: a job's figures, ready to be shown.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// The job's name, shown as the page title.
    pub title: String,
    pub job_id: String,
    /// The moment recency is measured from (RFC 3339).
    pub reference_time: String,
    /// Run facts, label -> value (input, rows read and kept, users, workers, timings...).
    pub facts: Vec<(String, String)>,
    /// Rows dropped, by a snake_case reason code such as `missing_user`.
    pub dropped: Vec<(String, u64)>,
    /// Seconds per phase, in phase order.
    pub seconds: Vec<(String, f64)>,
    /// The segments, in segment id order.
    pub segments: Vec<SegmentView>,
    /// Means over all customers (None: the job has no RFM figures).
    pub population: Option<Rfm>,
    /// The 25 recency x frequency score cells (None: no RFM scores).
    pub grid: Option<Vec<GridCell>>,
    pub map: Option<MapView>,
    /// ALS loss per iteration (empty: the job ran no ALS).
    pub als_loss: Vec<f64>,
    /// k-means inertia per Lloyd round.
    pub inertia: Vec<f64>,
    /// Clustering quality metrics, label -> formatted value.
    pub quality: Vec<(String, String)>,
    pub migration: Option<Migration>,
    pub k_choice: Option<KChoice>,
    /// What each RFM score means in the metric's units, one row per scored metric
    /// (empty: no scores).
    pub scores: Vec<ScoreRow>,
}

/// The ranges of one RFM metric behind scores 1 to 5.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreRow {
    /// The metric, in words (e.g. "Recency: days since the last order").
    pub metric: String,
    /// Five ranges, for scores 1 to 5, already formatted.
    pub bands: Vec<String>,
}

/// Recency, frequency and monetary means.
#[derive(Debug, Clone, Serialize)]
pub struct Rfm {
    pub recency_days: f64,
    pub frequency: f64,
    pub monetary: f64,
}

/// One segment's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentView {
    pub id: u32,
    /// Plain-language name such as "Champions" (None: the job has no RFM scores).
    pub name: Option<String>,
    /// Share (0..1) of the segment's customers in the cell group it is named after.
    pub name_share: f64,
    pub size: u64,
    /// Share of all customers, 0..1.
    pub share: f64,
    /// Sum of monetary (None: the log has no money column).
    pub revenue: Option<f64>,
    pub revenue_share: Option<f64>,
    /// The segment's means.
    pub rfm: Option<Rfm>,
    pub top_items: Vec<ItemView>,
}

/// An item that characterises a segment.
#[derive(Debug, Clone, Serialize)]
pub struct ItemView {
    pub id: String,
    pub label: Option<String>,
    /// Share of the segment's customers who bought it, 0..1.
    pub share: f64,
    /// How much more often the segment buys it than all customers do.
    pub lift: f64,
}

/// One cell of the 5 x 5 recency x frequency score grid.
#[derive(Debug, Clone, Serialize)]
pub struct GridCell {
    /// Recency score 1..=5 (5: bought most recently).
    pub r: u8,
    /// Frequency score 1..=5 (5: ordered most often).
    pub f: u8,
    pub name: String,
    /// Customers in this cell per segment (indexed like `Page::segments`).
    pub counts: Vec<u64>,
}

/// A 2-D projection of a sample of customers.
#[derive(Debug, Clone, Serialize)]
pub struct MapView {
    /// x, y, and the segment index into `Page::segments`.
    pub points: Vec<(f32, f32, u32)>,
    /// Share of variance explained by the two axes, 0..1.
    pub explained: [f64; 2],
    /// How many customers the sample was drawn from.
    pub sampled_from: u64,
}

/// How customers moved between the previous run's segments and this run's.
#[derive(Debug, Clone, Serialize)]
pub struct Migration {
    /// The previous run's segment ids (rows).
    pub from: Vec<u32>,
    /// This run's segment ids (columns).
    pub to: Vec<u32>,
    /// Customers, rows x columns.
    pub counts: Vec<Vec<u64>>,
    /// Per segment id of this run: how far its centroid moved (None: new segment).
    pub drift: Vec<(u32, Option<f64>)>,
    /// Where the previous run is.
    pub previous: String,
}

/// How the number of segments was chosen.
#[derive(Debug, Clone, Serialize)]
pub struct KChoice {
    pub rows: Vec<KRow>,
    pub chosen: u32,
    /// The rule that picked `chosen`, in words.
    pub rule: String,
}

/// The metrics of one candidate number of segments.
#[derive(Debug, Clone, Serialize)]
pub struct KRow {
    pub k: u32,
    pub inertia: f64,
    pub silhouette: Option<f64>,
    pub davies_bouldin: Option<f64>,
    pub calinski_harabasz: Option<f64>,
    pub stability: Option<f64>,
}
