//! The last step on a worker's shards: every user's segment, the segments'
//! partial figures (sizes, RFM sums and sketches, distances, feature sums), a
//! seeded sample for the silhouette, the per-shard output parts (assignments,
//! user factors, recommendations; item factors for the item shards), the held-out
//! evaluation and the segments' item counts.
//!
//! Output parts go to the writer shard by shard as they are made (a bounded
//! channel): a worker never holds more than a few parts at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_kernels::{Backend, Nearest, Resident, TopN};
use shoal_proto::pb;
use shoal_proto::sketch::Sketch;
use shoal_spec::rfm::{self, Cut, Quintiles, Scores, Scoring};
use tokio::sync::mpsc;

use crate::WorkerError;
use crate::extra;
use crate::job::{JobState, Shard, resident, stop_if_cancelled};
use crate::steps::als::Side;
use crate::steps::als_job::{AlsJob, Catalog, ranking_partial};
use crate::steps::audience::Audience;
use crate::steps::kmeans::sample_points;
use crate::steps::load::Rfm;
use crate::steps::outputs;

/// A file to write: its path below the output folder and its bytes.
pub type Part = (String, Vec<u8>);

/// What finalize answers besides the parts it wrote.
pub struct Finalized {
    pub shards: Vec<pb::ShardFinal>,
    pub item_files: Vec<pb::WrittenFile>,
    pub item_users: Vec<u64>,
    pub item_ids: Vec<pb::ItemShardIds>,
    /// recommend.users: ids of the list in this worker's shards, and unknown ones.
    pub requested: u64,
    pub unknown: u64,
}

/// Hands `part` to the writer; returns its entry for the manifest.
fn emit(
    out: &mpsc::Sender<Part>,
    rel: String,
    bytes: Vec<u8>,
    rows: u64,
) -> Result<pb::WrittenFile, WorkerError> {
    let file = pb::WrittenFile {
        path: rel.clone(),
        rows,
        bytes: bytes.len() as u64,
    };
    out.blocking_send((rel, bytes)).map_err(|_| {
        WorkerError::InvalidRequest("the output writer stopped (see its error)".into())
    })?;
    Ok(file)
}

/// Finalizes every shard of the job against `req.centroids` (`k` of them), with
/// the catalogue the recommendations need and the customers they go to (all
/// when there is no list).
pub fn finalize(
    job: &mut JobState,
    job_id: &str,
    req: &pb::FinalizeRequest,
    k: usize,
    (catalog, audience): (Option<Arc<Catalog>>, Option<Arc<Audience>>),
    backend: &dyn Backend,
    out: &mpsc::Sender<Part>,
) -> Result<Finalized, WorkerError> {
    job.check_dims(req.dims as usize, "centroids")?;
    let d = job.dims;
    let scoring = scoring(req)?;
    let ids = segment_ids(req, k)?;
    let catalog_items = match &catalog {
        Some(c) if !c.is_empty() => Some(backend.upload(&c.factors, job.als(job_id)?.f)?),
        _ => None,
    };
    let cold_parts = ColdParts {
        fold_in: job.fold_in,
        at: d - extra::dims(&job.extra_columns),
        dims: extra::dims(&job.extra_columns),
        weight: job.extra_weight,
        mean: job.extra_scaling.0.clone(),
        scale: job.extra_scaling.1.clone(),
    };
    let mut done = Finalized {
        shards: Vec::new(),
        item_files: Vec::new(),
        item_users: Vec::new(),
        item_ids: Vec::new(),
        requested: audience.as_ref().map_or(0, |a| a.requested()),
        unknown: 0,
    };
    if let Some(a) = &job.als {
        for (&id, shard) in &a.items {
            let names = &job.item_names[&id];
            let values = a.factors(Side::Items, job_id, id, backend)?;
            let part = outputs::factors_part("item_id", &names.ids, values, a.f)?;
            let rel = format!("item_factors.parquet/part-{id:05}.parquet");
            done.item_files
                .push(emit(out, rel, part, shard.rows() as u64)?);
            done.item_ids.push(pb::ItemShardIds {
                shard: id,
                ids: names
                    .ids
                    .iter()
                    .map(|v| v.unwrap_or_default().to_string())
                    .collect(),
                labels: names
                    .labels
                    .iter()
                    .map(|v| v.unwrap_or_default().to_string())
                    .collect(),
            });
        }
        done.item_users = vec![0; k * a.catalog_items() as usize];
        if let (true, Some(model)) = (a.items.is_empty(), &a.catalog) {
            // a fold-in: the model's items, in its order (no labels)
            done.item_ids.push(pb::ItemShardIds {
                shard: 0,
                ids: model
                    .ids
                    .iter()
                    .map(|v| v.unwrap_or_default().to_string())
                    .collect(),
                labels: vec![String::new(); model.len()],
            });
        }
    }
    // seconds spent per part of the work, for the log
    let mut spent = Spent::default();
    for (&id, shard) in job.shards.iter_mut() {
        stop_if_cancelled(&job.cancel, job_id)?;
        let mut files = Vec::new();
        let mut ranking = None;
        if let Some(a) = &job.als {
            let t = Instant::now();
            let values = a.factors(Side::Users, job_id, id, backend)?;
            let part = outputs::factors_part("user_id", shard.ids.ids(), values, a.f)?;
            spent.factors += t.elapsed();
            let rel = format!("user_factors.parquet/part-{id:05}.parquet");
            files.push(emit(out, rel, part, shard.len() as u64)?);
            if let (Some(catalog), Some(items)) = (&catalog, &catalog_items) {
                let t = Instant::now();
                // the customers of the list that this shard has (all without one)
                let rows: Vec<u32> = match &audience {
                    None => (0..shard.len() as u32).collect(),
                    Some(a) => {
                        let wanted = a.ids.get(&id).map_or(&[][..], Vec::as_slice);
                        let rows: Vec<u32> = wanted
                            .iter()
                            .filter_map(|(key, text)| {
                                shard
                                    .ids
                                    .position(*key)
                                    .filter(|&p| shard.ids.id(p as usize) == text)
                            })
                            .collect();
                        done.unknown += (wanted.len() - rows.len()) as u64;
                        rows
                    }
                };
                let all = audience.is_none();
                let (recs, rank) = recommend(a, job_id, id, items, (&rows, all), backend)?;
                spent.recommend += t.elapsed();
                ranking = rank;
                if let Some(top) = recs {
                    let t = Instant::now();
                    let (part, n) =
                        outputs::recommendations_part(shard.ids.ids(), &rows, &top, &catalog.ids)?;
                    spent.recommendations_part += t.elapsed();
                    let rel = format!("recommendations.parquet/part-{id:05}.parquet");
                    files.push(emit(out, rel, part, n)?);
                }
            }
        }
        let cold = cold_start(job_cold(&cold_parts, shard), &req.centroids, k, d, backend)?;
        let mut cold_counts = vec![0u64; if cold.is_empty() { 0 } else { k }];
        for n in &cold {
            cold_counts[n.best as usize] += 1;
        }
        let cold_users: Vec<&str> = shard
            .orphans
            .iter()
            .take(cold.len())
            .map(|(u, _)| u.as_str())
            .collect();
        if shard.is_empty() {
            let file = if cold.is_empty() {
                None
            } else {
                let bytes = outputs::assignments_part(
                    shard.ids.ids(),
                    (&shard.rfm, &[]),
                    &[],
                    &ids,
                    &cold_users,
                    &cold,
                )?;
                let rel = format!("assignments.parquet/part-{id:05}.parquet");
                Some(emit(out, rel, bytes, cold.len() as u64)?)
            };
            done.shards.push(pb::ShardFinal {
                shard: id,
                segments: empty_segments(k, d),
                sample: Vec::new(),
                file,
                files,
                ranking,
                cold_start: cold_counts,
            });
            continue;
        }
        let t = Instant::now();
        let points = resident(&shard.points, job_id, id)?;
        backend.assign(points, &req.centroids, k, &mut shard.nearest)?;
        let all_rows: Vec<u32> = (0..shard.len() as u32).collect();
        let scaled = backend.download_rows(points, &all_rows)?;
        let scores = shard_scores(&scoring, shard.ids.keys(), &shard.rfm);
        let segments = segment_partials(
            (&shard.rfm, &scores, scoring.names()),
            &scaled,
            &shard.nearest,
            k,
            d,
        );
        drop(scaled);
        spent.segments += t.elapsed();
        let t = Instant::now();
        let sample = sample_points(
            shard.ids.keys(),
            Some(&shard.nearest),
            points,
            backend,
            req.seed,
            req.sample_size as usize,
            d,
        )?;
        let bytes = outputs::assignments_part(
            shard.ids.ids(),
            (&shard.rfm, &scores),
            &shard.nearest,
            &ids,
            &cold_users,
            &cold,
        )?;
        spent.assignments += t.elapsed();
        if let Some(a) = &job.als {
            let t = Instant::now();
            let labels: Vec<u32> = shard.nearest.iter().map(|n| n.best).collect();
            a.count_segment_items(job_id, id, &labels, &mut done.item_users)?;
            spent.items += t.elapsed();
        }
        let rel = format!("assignments.parquet/part-{id:05}.parquet");
        let file = emit(out, rel, bytes, (shard.len() + cold.len()) as u64)?;
        done.shards.push(pb::ShardFinal {
            shard: id,
            segments,
            sample,
            file: Some(file),
            files,
            ranking,
            cold_start: cold_counts,
        });
    }
    tracing::debug!(
        factors_s = spent.factors.as_secs_f64(),
        recommend_s = spent.recommend.as_secs_f64(),
        recommendations_part_s = spent.recommendations_part.as_secs_f64(),
        segments_s = spent.segments.as_secs_f64(),
        assignments_s = spent.assignments.as_secs_f64(),
        items_s = spent.items.as_secs_f64(),
        "finalize: where the time went"
    );
    Ok(done)
}

/// Time spent on each part of a finalize.
#[derive(Default)]
struct Spent {
    factors: Duration,
    recommend: Duration,
    recommendations_part: Duration,
    segments: Duration,
    assignments: Duration,
    items: Duration,
}

/// Recommendations (`top_n` items per user, the training items excluded when
/// `exclude_seen`) of the users `rows` of one user shard (`all`: they are every
/// user, in order), and the ranking partial (`eval_k`, when items were held out)
/// of every user of the shard.
fn recommend(
    a: &AlsJob,
    job: &str,
    shard: u32,
    items: &Resident,
    (rows, all): (&[u32], bool),
    backend: &dyn Backend,
) -> Result<(Option<TopN>, Option<pb::RankingPartial>), WorkerError> {
    let x = a.resident(Side::Users, job, shard)?;
    let (seen, held) = a.seen_and_held(job, shard)?;
    let recs = if a.top_n == 0 {
        None
    } else if all {
        let exclude = backend.upload_sparse(&seen)?;
        Some(backend.top_n(x, items, a.top_n, a.exclude_seen.then_some(&exclude))?)
    } else {
        // the listed users only: their factors and exclusions
        let queries = backend.upload(&backend.download_rows(x, rows)?, a.f)?;
        let exclude = backend.upload_sparse(&seen.select_rows(rows))?;
        Some(backend.top_n(&queries, items, a.top_n, a.exclude_seen.then_some(&exclude))?)
    };
    let ranking = if a.holdout > 0.0 && a.eval_k > 0 {
        let top = match &recs {
            Some(r) if all && a.exclude_seen && a.top_n == a.eval_k => r.clone(),
            _ => {
                let exclude = backend.upload_sparse(&seen)?;
                backend.top_n(x, items, a.eval_k, Some(&exclude))?
            }
        };
        Some(ranking_partial(&top, &held))
    } else {
        None
    };
    Ok((recs, ranking))
}

/// What a fold-in needs to assign a shard's cold-start users.
struct ColdParts {
    fold_in: bool,
    /// Where the extra block starts in the feature vector, and its length.
    at: usize,
    dims: usize,
    weight: f64,
    mean: Vec<f64>,
    scale: Vec<f64>,
}

/// The scaled extra features (row-major, `parts.dims` each) of the shard's
/// users without interactions, when the job assigns them (a fold-in with an
/// extra block that weighs something), with the block's place; `None`
/// otherwise.
fn job_cold(parts: &ColdParts, shard: &Shard) -> Option<(Vec<f32>, usize, usize)> {
    if !parts.fold_in || parts.dims == 0 || parts.weight <= 0.0 || shard.orphans.is_empty() {
        return None;
    }
    let mut features = Vec::with_capacity(shard.orphans.len() * parts.dims);
    for (_, values) in &shard.orphans {
        features.extend(extra::scaled(
            values,
            &parts.mean,
            &parts.scale,
            parts.weight,
        ));
    }
    Some((features, parts.at, parts.dims))
}

/// Nearest and second nearest centroid of each cold-start user by the extra
/// block alone: its features against the same block of every centroid.
fn cold_start(
    cold: Option<(Vec<f32>, usize, usize)>,
    centroids: &[f32],
    k: usize,
    d: usize,
    backend: &dyn Backend,
) -> Result<Vec<Nearest>, WorkerError> {
    let Some((features, at, e)) = cold else {
        return Ok(Vec::new());
    };
    let block: Vec<f32> = centroids
        .chunks_exact(d)
        .flat_map(|c| c[at..at + e].iter().copied())
        .collect();
    let points = backend.upload(&features, e)?;
    let mut nearest = vec![Nearest::default(); features.len() / e];
    backend.assign(&points, &block, k, &mut nearest)?;
    Ok(nearest)
}

fn empty_segments(k: usize, d: usize) -> Vec<pb::SegmentPartial> {
    (0..k)
        .map(|_| pb::SegmentPartial {
            count: 0,
            rfm_sum: vec![0.0; 3],
            rfm_sketch: vec![Sketch::default().to_proto(); 3],
            distance_sum: 0.0,
            inertia: 0.0,
            feature_sum: vec![0.0; d],
            rfm_cells: Vec::new(),
            score_sums: vec![0; 3],
        })
        .collect()
}

fn segment_partials(
    (rfm, scores, named): (&Rfm, &[Scores], bool),
    points: &[f32],
    nearest: &[Nearest],
    k: usize,
    d: usize,
) -> Vec<pb::SegmentPartial> {
    let mut cells = vec![0u64; if named { k * 25 } else { 0 }];
    let mut score_sums = vec![[0u64; 3]; k];
    for (sc, n) in scores.iter().zip(nearest) {
        let s = n.best as usize;
        if let Some(c) = sc.cell() {
            cells[s * 25 + c] += 1;
        }
        for (sum, score) in score_sums[s].iter_mut().zip([sc.r, sc.f, sc.m]) {
            *sum += u64::from(score.unwrap_or(0));
        }
    }
    let mut feature_sum = vec![0.0f64; k * d];
    let mut count = vec![0u64; k];
    let mut sums = vec![[0.0f64; 3]; k];
    let mut sketches = vec![[Sketch::default(), Sketch::default(), Sketch::default()]; k];
    let mut dist = vec![0.0f64; k];
    let mut inertia = vec![0.0f64; k];
    for (i, n) in nearest.iter().enumerate() {
        let s = n.best as usize;
        let v = [
            rfm.recency_days[i],
            rfm.frequency[i] as f64,
            rfm.monetary[i],
        ];
        count[s] += 1;
        for j in 0..3 {
            sums[s][j] += v[j];
            sketches[s][j].add(v[j]);
        }
        for (j, x) in points[i * d..(i + 1) * d].iter().enumerate() {
            feature_sum[s * d + j] += f64::from(*x);
        }
        dist[s] += f64::from(n.best_dist).sqrt();
        inertia[s] += f64::from(n.best_dist);
    }
    (0..k)
        .map(|s| pb::SegmentPartial {
            count: count[s],
            rfm_sum: sums[s].to_vec(),
            rfm_sketch: sketches[s].iter().map(Sketch::to_proto).collect(),
            distance_sum: dist[s],
            inertia: inertia[s],
            feature_sum: feature_sum[s * d..(s + 1) * d].to_vec(),
            rfm_cells: if named {
                cells[s * 25..(s + 1) * 25].to_vec()
            } else {
                Vec::new()
            },
            score_sums: score_sums[s].to_vec(),
        })
        .collect()
}

/// The segment id of each centroid: the request's (segments.previous), else its
/// index.
fn segment_ids(req: &pb::FinalizeRequest, k: usize) -> Result<Vec<u32>, WorkerError> {
    if req.segment_ids.is_empty() {
        return Ok((0..k as u32).collect());
    }
    if req.segment_ids.len() != k {
        return Err(WorkerError::InvalidRequest(format!(
            "{} segment ids for {k} centroids",
            req.segment_ids.len()
        )));
    }
    Ok(req.segment_ids.clone())
}

/// The RFM quintiles of a finalize request (`None` per metric it does not score).
pub fn scoring(req: &pb::FinalizeRequest) -> Result<Scoring, WorkerError> {
    let metric = |i: usize| -> Result<Option<Quintiles>, WorkerError> {
        let Some(q) = req.rfm_quintiles.get(i) else {
            return Ok(None);
        };
        if q.keys.is_empty() {
            return Ok(None);
        }
        if q.keys.len() != 4 || q.ties.len() != 4 {
            return Err(WorkerError::InvalidRequest(format!(
                "the {} quintiles have {} cuts and {} tie-breaks, not 4",
                rfm::METRICS[i],
                q.keys.len(),
                q.ties.len()
            )));
        }
        let cut = |j: usize| Cut {
            key: q.keys[j],
            tie: q.ties[j],
        };
        Ok(Some(Quintiles {
            cuts: [cut(0), cut(1), cut(2), cut(3)],
        }))
    };
    Ok(Scoring {
        recency: metric(0)?,
        frequency: metric(1)?,
        monetary: metric(2)?,
    })
}

/// The scores of a shard's users (user keys `keys`, metrics `rfm`).
fn shard_scores(scoring: &Scoring, keys: &[u64], rfm: &Rfm) -> Vec<Scores> {
    keys.iter()
        .enumerate()
        .map(|(u, &key)| scoring.score(key, rfm.recency_days[u], rfm.frequency[u], rfm.monetary[u]))
        .collect()
}
