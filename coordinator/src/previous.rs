//! `segments.previous`: an earlier run's output whose segment ids this run keeps.
//!
//! The earlier segments are placed in this run's feature space through the
//! customers they held: the workers read the earlier assignments, and each
//! earlier segment's centroid here is the mean of this run's features of its
//! customers who are still here (factor spaces of two ALS trainings are not
//! comparable, customers are). This run's centroids are matched to those by
//! optimal assignment (the Hungarian method, on squared Euclidean distance);
//! a matched segment takes the earlier id, the others new ids after the largest
//! earlier one. The same answers give the migration matrix (customers from each
//! earlier id to each new id) and each centroid's drift.

use crate::CoordinatorError;
use pathfinding::matrix::Matrix;
use pathfinding::prelude::kuhn_munkres_min;
use serde::Serialize;
use shoal_spec::manifest::{MANIFEST, Manifest};
use shoal_store::{self as store, Location};

/// What this run needs of the earlier one.
#[derive(Debug, Clone)]
pub struct Previous {
    pub folder: Location,
    pub job_id: String,
    /// Its features, in order (report.json `features`).
    pub features: Vec<String>,
    /// Its segments' ids and sizes, in its order.
    pub segments: Vec<(u32, u64)>,
    /// Its `assignments.parquet/` parts, and the shards it had.
    pub parts: Vec<String>,
    pub shards: u32,
}

fn bad(url: &str, reason: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Previous {
        url: url.to_string(),
        reason: reason.into(),
    }
}

impl Previous {
    /// Reads the earlier output at `url` (a finished job's folder: its manifest,
    /// report and assignments).
    pub async fn load(url: &str) -> Result<Previous, CoordinatorError> {
        let folder = store::resolve(url)?;
        let url = folder.url();
        if folder.child(MANIFEST).head().await?.is_none() {
            return Err(bad(
                &url,
                "no _SUCCESS manifest: not the output folder of a finished shoal job (or the job did not finish)",
            ));
        }
        let text = folder.child(MANIFEST).get().await?;
        let manifest = Manifest::from_json(&String::from_utf8_lossy(&text))
            .map_err(|e| bad(&url, format!("_SUCCESS is not a shoal manifest: {e}")))?;
        let report = folder.child("report.json").get().await?;
        let report: serde_json::Value = serde_json::from_slice(&report)
            .map_err(|e| bad(&url, format!("report.json is not valid JSON: {e}")))?;
        let features: Vec<String> = report["features"]
            .as_array()
            .map(|f| {
                f.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let segments: Vec<(u32, u64)> = report["segments"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|s| Some((s["segment"].as_u64()? as u32, s["size"].as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        if features.is_empty() || segments.is_empty() {
            return Err(bad(
                &url,
                "its report.json lists no features or no segments (a shoal output of an older version?)",
            ));
        }
        let parts: Vec<String> = manifest
            .files
            .iter()
            .filter(|f| f.path.starts_with("assignments.parquet/"))
            .map(|f| f.path.clone())
            .collect();
        Ok(Previous {
            folder,
            job_id: manifest.job_id.clone(),
            features,
            segments,
            parts,
            shards: manifest.spec.cluster.shards,
        })
    }

    /// Refuses an earlier run that segmented on other features.
    pub fn check_features(&self, features: &[String]) -> Result<(), CoordinatorError> {
        if features == self.features.as_slice() {
            return Ok(());
        }
        let first = features
            .iter()
            .zip(&self.features)
            .position(|(a, b)| a != b)
            .unwrap_or(features.len().min(self.features.len()));
        let at = |f: &[String]| {
            f.get(first)
                .map_or("(none)".to_string(), |s| format!("`{s}`"))
        };
        Err(bad(
            &self.folder.url(),
            format!(
                "it segmented on {} features and this job on {}: feature {} is {} there and {} here. Segment ids can only follow segments of the same features: use the earlier run's [features] (and als.factors), or leave segments.previous out",
                self.features.len(),
                features.len(),
                first + 1,
                at(&self.features),
                at(features)
            ),
        ))
    }
}

/// Optimal assignment of `k_new` centroids to `k_old` earlier ones, minimising the
/// total cost (`cost[new * k_old + old]`); `None` for a centroid left unmatched
/// (more new than earlier segments) or matched to an earlier segment without a
/// cost (`NaN`: none of its customers is here).
pub fn assign(cost: &[f64], k_new: usize, k_old: usize) -> Vec<Option<usize>> {
    let usable: Vec<usize> = (0..k_old)
        .filter(|&o| (0..k_new).all(|n| cost[n * k_old + o].is_finite()))
        .collect();
    if usable.is_empty() || k_new == 0 {
        return vec![None; k_new];
    }
    // integer weights (the method needs an exact order): the costs relative to
    // the largest, in units of 1e-12 of it
    let max = usable
        .iter()
        .flat_map(|&o| (0..k_new).map(move |n| cost[n * k_old + o]))
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let weight = |n: usize, o: usize| ((cost[n * k_old + o] / max) * 1e12).round() as i64;
    let mut out = vec![None; k_new];
    if k_new <= usable.len() {
        let m = Matrix::from_fn(k_new, usable.len(), |(n, j)| weight(n, usable[j]));
        let (_, cols) = kuhn_munkres_min(&m);
        for (n, j) in cols.into_iter().enumerate() {
            out[n] = Some(usable[j]);
        }
    } else {
        let m = Matrix::from_fn(usable.len(), k_new, |(j, n)| weight(n, usable[j]));
        let (_, cols) = kuhn_munkres_min(&m);
        for (j, n) in cols.into_iter().enumerate() {
            out[n] = Some(usable[j]);
        }
    }
    out
}

/// How customers moved from the earlier run's segments to this run's.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Migration {
    /// Where the earlier run is, and its job.
    pub previous: String,
    pub previous_job_id: String,
    /// The earlier run's segment ids (rows) and this run's (columns).
    pub from: Vec<u32>,
    pub to: Vec<u32>,
    /// Customers in both runs, from (row) -> to (column).
    pub counts: Vec<Vec<u64>>,
    /// Per `to`: customers new in this run.
    pub new_customers: Vec<u64>,
    /// Per `from`: the earlier segment's customers not in this run.
    pub gone_customers: Vec<u64>,
    /// Per segment of this run: the earlier id it keeps (none: a new id) and how
    /// far its centroid is from that segment's (its customers' mean in this run's
    /// feature space).
    pub drift: Vec<Drift>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Drift {
    pub segment: u32,
    pub previous: Option<u32>,
    pub distance: Option<f64>,
}

/// What the matching decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Matched {
    /// Per centroid (in the order sent to the workers): its segment id.
    pub ids: Vec<u32>,
    pub migration: Migration,
}

/// The merged answers of the workers about the earlier run.
pub struct Overlap {
    /// Per earlier segment (in `Previous::segments` order): customers here, and
    /// the sums of their features (row-major, dims each).
    pub counts: Vec<u64>,
    pub sums: Vec<f64>,
    /// Earlier segment x centroid: customers.
    pub moves: Vec<u64>,
    /// Per centroid: customers not in the earlier run.
    pub new_users: Vec<u64>,
}

/// Matches `centroids` (`k` x `dims`, in the job's order) to the earlier
/// segments and names every one.
pub fn match_segments(
    previous: &Previous,
    overlap: &Overlap,
    centroids: &[f32],
    dims: usize,
) -> Matched {
    let k = centroids.len() / dims.max(1);
    let old = previous.segments.len();
    let mean = |o: usize| -> Option<Vec<f64>> {
        let n = overlap.counts[o];
        (n > 0).then(|| {
            overlap.sums[o * dims..(o + 1) * dims]
                .iter()
                .map(|s| s / n as f64)
                .collect()
        })
    };
    let means: Vec<Option<Vec<f64>>> = (0..old).map(mean).collect();
    let dist = |c: usize, o: usize| -> f64 {
        match &means[o] {
            None => f64::NAN,
            Some(m) => centroids[c * dims..(c + 1) * dims]
                .iter()
                .zip(m)
                .map(|(&x, &y)| (f64::from(x) - y).powi(2))
                .sum(),
        }
    };
    let cost: Vec<f64> = (0..k)
        .flat_map(|c| (0..old).map(move |o| (c, o)))
        .map(|(c, o)| dist(c, o))
        .collect();
    let pairs = assign(&cost, k, old);
    let mut next = previous
        .segments
        .iter()
        .map(|s| s.0)
        .max()
        .map_or(0, |m| m + 1);
    let ids: Vec<u32> = pairs
        .iter()
        .map(|p| match p {
            Some(o) => previous.segments[*o].0,
            None => {
                next += 1;
                next - 1
            }
        })
        .collect();
    // the matrix in id order on both sides
    let mut from: Vec<(u32, usize)> = previous
        .segments
        .iter()
        .enumerate()
        .map(|(o, s)| (s.0, o))
        .collect();
    from.sort_unstable();
    let mut to: Vec<(u32, usize)> = ids.iter().enumerate().map(|(c, &id)| (id, c)).collect();
    to.sort_unstable();
    let counts: Vec<Vec<u64>> = from
        .iter()
        .map(|&(_, o)| to.iter().map(|&(_, c)| overlap.moves[o * k + c]).collect())
        .collect();
    let gone_customers: Vec<u64> = from
        .iter()
        .zip(&counts)
        .map(|(&(_, o), row)| previous.segments[o].1.saturating_sub(row.iter().sum()))
        .collect();
    Matched {
        migration: Migration {
            previous: previous.folder.url(),
            previous_job_id: previous.job_id.clone(),
            from: from.iter().map(|f| f.0).collect(),
            to: to.iter().map(|t| t.0).collect(),
            counts,
            new_customers: to.iter().map(|&(_, c)| overlap.new_users[c]).collect(),
            gone_customers,
            drift: to
                .iter()
                .map(|&(id, c)| Drift {
                    segment: id,
                    previous: pairs[c].map(|o| previous.segments[o].0),
                    distance: pairs[c].map(|o| dist(c, o).sqrt()),
                })
                .collect(),
        },
        ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cheapest_assignment_wins_over_the_greedy_one() {
        // greedy (new 0 takes old 0 at cost 1) would leave new 1 with cost 100;
        // the optimum pairs 0-1 and 1-0 at 2 + 2
        let cost = [1.0, 2.0, 2.0, 100.0];
        assert_eq!(assign(&cost, 2, 2), vec![Some(1), Some(0)]);
    }

    #[test]
    fn more_new_than_old_leaves_the_farthest_unmatched() {
        // three new, two old: new 1 is far from both
        let cost = [0.1, 9.0, 50.0, 60.0, 8.0, 0.2];
        assert_eq!(assign(&cost, 3, 2), vec![Some(0), None, Some(1)]);
        // fewer new than old: each new gets its own
        let cost = [5.0, 0.1, 7.0];
        assert_eq!(assign(&cost, 1, 3), vec![Some(1)]);
        // an earlier segment nobody is left in is never matched
        let cost = [f64::NAN, 1.0, f64::NAN, 3.0];
        assert_eq!(assign(&cost, 2, 2), vec![Some(1), None]);
    }

    fn previous(segments: Vec<(u32, u64)>) -> Previous {
        Previous {
            folder: store::resolve("/tmp/earlier").unwrap(),
            job_id: "job-earlier".into(),
            features: vec!["a".into(), "b".into()],
            segments,
            parts: Vec::new(),
            shards: 4,
        }
    }

    #[test]
    fn ids_follow_the_earlier_segments_and_new_ones_come_after() {
        // earlier ids 3 and 7 at (0,0) and (10,10); three centroids now
        let prev = previous(vec![(3, 100), (7, 50)]);
        let overlap = Overlap {
            counts: vec![90, 40],
            sums: vec![0.0, 0.0, 400.0, 400.0],
            // earlier 3 -> centroid 1 (80) and 2 (10); earlier 7 -> centroid 0 (40)
            moves: vec![0, 80, 10, 40, 0, 0],
            new_users: vec![5, 6, 7],
        };
        let centroids = [10.0f32, 10.0, 0.5, 0.0, 50.0, 50.0];
        let m = match_segments(&prev, &overlap, &centroids, 2);
        assert_eq!(m.ids, vec![7, 3, 8]);
        let mig = &m.migration;
        assert_eq!(mig.from, vec![3, 7]);
        assert_eq!(mig.to, vec![3, 7, 8]);
        assert_eq!(mig.counts, vec![vec![80, 0, 10], vec![0, 40, 0]]);
        assert_eq!(mig.new_customers, vec![6, 5, 7]);
        assert_eq!(mig.gone_customers, vec![10, 10]);
        assert_eq!(mig.drift[0].previous, Some(3));
        assert!((mig.drift[0].distance.unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(
            mig.drift[2],
            Drift {
                segment: 8,
                previous: None,
                distance: None
            }
        );
    }

    #[test]
    fn other_features_are_refused_naming_the_first_difference() {
        let prev = previous(vec![(0, 1)]);
        let err = prev
            .check_features(&["a".into(), "c".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("feature 2 is `b` there and `c` here"), "{err}");
        assert!(prev.check_features(&["a".into(), "b".into()]).is_ok());
    }
}
