//! A job's ALS state on one worker: the pairs of the user and item shards it
//! owns, their confidence matrices and factors resident in the backend, the local
//! copies of the other side's rows they need, and the versions published.

use crate::WorkerError;
use crate::als::{self, Needed, Pairs, Side};
use crate::flight::Shelf;
use rayon::prelude::*;
use shoal_kernels::{Backend, CgParams, Csr, Resident};
use shoal_proto::pb;
use shoal_proto::spec::AlsSpec;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Every row of resident dense data, row-major.
/// An error when a failed half-step left `linked`'s factors partly solved.
fn usable(linked: &Linked, job: &str) -> Result<(), WorkerError> {
    match &linked.broken {
        None => Ok(()),
        Some(why) => Err(WorkerError::Inconsistent {
            job: job.to_string(),
            detail: format!("the ALS factors cannot be used: {why}; run the job again"),
        }),
    }
}

fn download_all(backend: &dyn Backend, m: &Resident) -> Result<Vec<f32>, WorkerError> {
    let all: Vec<u32> = (0..m.n() as u32).collect();
    Ok(backend.download_rows(m, &all)?)
}

/// One shard of one side held by this worker.
pub struct OwnedShard {
    pub pairs: Pairs,
    /// The confidence matrix in the worker's local space of the other side (host
    /// copy for the exclusions of the recommendations, resident copy for the
    /// solve).
    pub conf: Option<(Csr, Resident)>,
    pub factors: Option<Resident>,
}

/// The other side's rows a side of this worker needs, and their resident copy.
pub struct Local {
    pub needed: Needed,
    pub rows: Resident,
}

pub struct Linked {
    /// owners[s]: the address of the worker holding user and item shard s.
    pub owners: Vec<String>,
    /// For the user side: the item rows it needs; for the item side: the user rows.
    pub items_local: Local,
    pub users_local: Local,
    /// Half-steps applied per side.
    pub user_version: u32,
    pub item_version: u32,
    /// Set when a half-step failed part way: some shards' factors moved on and
    /// others did not, so no later step may start from them.
    pub broken: Option<String>,
}

pub struct AlsJob {
    pub spec: AlsSpec,
    pub f: usize,
    pub seed: u64,
    pub holdout: f64,
    pub shards: u32,
    pub users: BTreeMap<u32, OwnedShard>,
    pub items: BTreeMap<u32, OwnedShard>,
    pub linked: Option<Linked>,
    /// `recommend.top_n`, `recommend.exclude_seen`, `evaluate.k` of the spec.
    pub top_n: usize,
    pub exclude_seen: bool,
    pub eval_k: usize,
    /// Fold-in: the model's items, fixed.
    pub catalog: Option<Arc<Catalog>>,
}

/// Rows of the other side to fetch for a half-step: per shard the positions, and
/// where they go in the local copy.
#[derive(Debug, Clone)]
pub struct FetchPlan {
    pub side: Side,
    /// Half-steps of `side` applied when the plan was made (checked again when
    /// the step runs).
    pub own_version: u32,
    /// Version of the other side's factors to fetch.
    pub version: u32,
    pub owners: Vec<String>,
    /// (shard, positions, first local row)
    pub parts: Vec<(u32, Vec<u32>, u32)>,
}

impl AlsJob {
    fn owned(&self, side: Side) -> &BTreeMap<u32, OwnedShard> {
        match side {
            Side::Users => &self.users,
            Side::Items => &self.items,
        }
    }

    /// The shards of the other side that `side`'s pairs refer to.
    pub fn other_shards(&self, side: Side) -> BTreeSet<u32> {
        self.owned(side)
            .values()
            .flat_map(|s| s.pairs.others.iter())
            .map(|id| shoal_proto::hash::shard_of(id, self.shards))
            .collect()
    }

    fn linked(&self, job: &str) -> Result<&Linked, WorkerError> {
        let linked = self.linked.as_ref().ok_or_else(|| {
            WorkerError::InvalidRequest(format!("ALS of job {job} is not linked yet"))
        })?;
        usable(linked, job)?;
        Ok(linked)
    }

    /// Builds the confidence matrices and the initial factors, once the id lists
    /// of the other side's shards are known (`item_lists` for the user side,
    /// `user_lists` for the item side); publishes version 0 of every owned shard's
    /// factors and returns the Gram matrix of each owned item shard.
    #[allow(clippy::too_many_arguments)]
    pub fn link(
        &mut self,
        job: &str,
        owners: Vec<String>,
        item_lists: &HashMap<u32, Arc<Vec<String>>>,
        user_lists: &HashMap<u32, Arc<Vec<String>>>,
        backend: &dyn Backend,
        shelf: &Shelf,
    ) -> Result<Vec<pb::GramPartial>, WorkerError> {
        let f = self.f;
        let mut locals = Vec::new();
        for (side, lists) in [(Side::Users, item_lists), (Side::Items, user_lists)] {
            let shards = self.shards;
            let owned = match side {
                Side::Users => &mut self.users,
                Side::Items => &mut self.items,
            };
            let located: Vec<Vec<(u32, u32)>> = owned
                .values()
                .map(|s| als::locate(job, &s.pairs.others, shards, lists))
                .collect::<Result<_, _>>()?;
            let needed = Needed::new(located.iter().flatten().copied().collect());
            for ((&id, shard), located) in owned.iter_mut().zip(&located) {
                let csr = als::confidence_matrix(&shard.pairs, located, &needed, &self.spec);
                let resident = backend.upload_sparse(&csr)?;
                shard.conf = Some((csr, resident));
                let mut init = vec![0f32; shard.pairs.rows() * f];
                for (r, id) in shard.pairs.ids.iter().enumerate() {
                    als::initial_row(self.seed, side, id, &mut init[r * f..(r + 1) * f]);
                }
                shard.factors = Some(backend.upload(&init, f)?);
                shelf.put_factors(job, side, id, 0, f, init)?;
            }
            let rows = backend.upload(&vec![0f32; needed.rows.len() * f], f)?;
            locals.push(Local { needed, rows });
        }
        let users_local = locals.pop().expect("two sides");
        let items_local = locals.pop().expect("two sides");
        self.linked = Some(Linked {
            owners,
            items_local,
            users_local,
            user_version: 0,
            item_version: 0,
            broken: None,
        });
        self.items
            .iter()
            .map(|(&id, s)| {
                let y = s.factors.as_ref().expect("just initialised");
                Ok(pb::GramPartial {
                    shard: id,
                    gram: backend.gram(y)?,
                    data_loss: 0.0,
                    rows: y.n() as u64,
                })
            })
            .collect()
    }

    /// What `side`'s half-step of `iteration` must fetch first.
    pub fn fetch_plan(
        &self,
        job: &str,
        side: Side,
        iteration: u32,
    ) -> Result<FetchPlan, WorkerError> {
        let linked = self.linked(job)?;
        let (own_version, local, version) = match side {
            Side::Users => (linked.user_version, &linked.items_local, iteration),
            Side::Items => (linked.item_version, &linked.users_local, iteration + 1),
        };
        if own_version != iteration {
            return Err(WorkerError::StaleFactors {
                what: format!("{} factors of job {job}", side.as_str()),
                have: own_version,
                wanted: iteration,
            });
        }
        Ok(FetchPlan {
            side,
            own_version,
            version,
            owners: linked.owners.clone(),
            parts: local.needed.by_shard(),
        })
    }

    /// The half-step: writes the fetched rows into the local copy, solves every
    /// owned shard of `side` against them and `gram` (the other side's Gram),
    /// publishes the new factors, and returns each shard's Gram matrix (and, for
    /// the item side, its data loss).
    pub fn step(
        &mut self,
        job: &str,
        plan: &FetchPlan,
        fetched: Vec<Vec<f32>>,
        gram: &[f64],
        backend: &dyn Backend,
        shelf: &Shelf,
    ) -> Result<Vec<pb::GramPartial>, WorkerError> {
        let f = self.f;
        if gram.len() != f * f {
            return Err(WorkerError::InvalidRequest(format!(
                "a Gram matrix of {} values for {f} factors",
                gram.len()
            )));
        }
        let params = CgParams {
            regularization: self.spec.regularization as f32,
            cg_steps: self.spec.cg_steps,
            // the loss of an iteration is taken once both sides are solved
            pair_loss: plan.side == Side::Items,
        };
        let linked = self.linked.as_mut().ok_or_else(|| {
            WorkerError::InvalidRequest(format!("ALS of job {job} is not linked yet"))
        })?;
        usable(linked, job)?;
        let current = match plan.side {
            Side::Users => linked.user_version,
            Side::Items => linked.item_version,
        };
        if current != plan.own_version {
            // another call for the same half-step ran in between
            return Err(WorkerError::StaleFactors {
                what: format!("{} factors of job {job}", plan.side.as_str()),
                have: current,
                wanted: plan.own_version,
            });
        }
        let version = plan.own_version + 1;
        let (owned, local) = match plan.side {
            Side::Users => (&mut self.users, &mut linked.items_local),
            Side::Items => (&mut self.items, &mut linked.users_local),
        };
        for ((_, positions, first), values) in plan.parts.iter().zip(&fetched) {
            if values.len() != positions.len() * f {
                return Err(WorkerError::Inconsistent {
                    job: job.to_string(),
                    detail: format!(
                        "{} values fetched for {} rows of {f} factors",
                        values.len(),
                        positions.len()
                    ),
                });
            }
            let rows: Vec<u32> = (*first..*first + positions.len() as u32).collect();
            backend.write_rows(&mut local.rows, &rows, values)?;
        }
        // The shards are solved side by side (each solve is parallel inside too):
        // a worker's few small shards would otherwise leave cores idle at the end
        // of each one.
        let started = std::time::Instant::now();
        let local_rows = &local.rows;
        let results: Vec<Result<(pb::GramPartial, Vec<f32>), WorkerError>> = owned
            .par_iter_mut()
            .map(|(&id, shard)| {
                let (_, conf) = shard.conf.as_ref().expect("linked shards have confidences");
                let x = shard.factors.as_mut().expect("linked shards have factors");
                let pair_loss = backend.als_solve(x, local_rows, gram, conf, params)?;
                let host = download_all(backend, x)?;
                let own_gram = backend.gram(x)?;
                // the loss of the finished iteration (item side): new items
                // against new users
                let data_loss = pair_loss.map_or(0.0, |p| als::data_loss(p, gram, &own_gram));
                let partial = pb::GramPartial {
                    shard: id,
                    gram: own_gram,
                    data_loss,
                    rows: x.n() as u64,
                };
                Ok((partial, host))
            })
            .collect();
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            linked.broken = Some(format!(
                "its {} half-step {} failed part way ({e})",
                plan.side.as_str(),
                plan.own_version + 1
            ));
        }
        let mut out = Vec::with_capacity(results.len());
        let mut solved = Vec::with_capacity(results.len());
        for r in results {
            let (partial, host) = r?;
            solved.push((partial.shard, host));
            out.push(partial);
        }
        // published once every shard is solved: a failed step publishes nothing
        for (id, host) in solved {
            shelf.put_factors(job, plan.side, id, version, f, host)?;
        }
        match plan.side {
            Side::Users => linked.user_version = version,
            Side::Items => linked.item_version = version,
        }
        tracing::debug!(
            side = plan.side.as_str(),
            shards = out.len(),
            solve_s = started.elapsed().as_secs_f64(),
            "ALS half-step: shards solved"
        );
        Ok(out)
    }

    /// The users of `shard` as features: L2-normalised factors times `weight`
    /// (row-major, `f` per user; a zero row stays zero).
    pub fn user_features(
        &self,
        job: &str,
        shard: u32,
        weight: f64,
        backend: &dyn Backend,
    ) -> Result<Vec<f32>, WorkerError> {
        let x = self.resident(Side::Users, job, shard)?;
        let mut rows = download_all(backend, x)?;
        for row in rows.chunks_exact_mut(self.f.max(1)) {
            let norm = row
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt();
            let k = if norm > 0.0 { weight / norm } else { 0.0 };
            row.iter_mut().for_each(|v| *v = (f64::from(*v) * k) as f32);
        }
        Ok(rows)
    }

    /// The resident factors of an owned shard.
    fn resident(&self, side: Side, job: &str, shard: u32) -> Result<&Resident, WorkerError> {
        let owned = self
            .owned(side)
            .get(&shard)
            .ok_or(WorkerError::UnknownShard {
                job: job.to_string(),
                shard,
            })?;
        owned.factors.as_ref().ok_or_else(|| {
            WorkerError::InvalidRequest(format!(
                "job {job}: the ALS factors of {} shard {shard} do not exist yet (AlsLink or AlsFoldIn comes first)",
                side.as_str()
            ))
        })
    }

    /// The current factors of an owned shard (row-major).
    pub fn factors(
        &self,
        side: Side,
        job: &str,
        shard: u32,
        backend: &dyn Backend,
    ) -> Result<Vec<f32>, WorkerError> {
        download_all(backend, self.resident(side, job, shard)?)
    }
}

/// Every item of the job in the global order (item shard, position): ids and
/// final factors, fetched once for recommendations and evaluation.
pub struct Catalog {
    pub ids: Vec<String>,
    pub factors: Vec<f32>,
    lists: HashMap<u32, (u32, Arc<Vec<String>>)>,
    shards: u32,
    /// For a catalog read from a model's table: id -> index.
    lookup: HashMap<String, u32>,
}

impl Catalog {
    /// From each item shard's ids and factors (`f` per row), in shard order.
    pub fn new(
        job: &str,
        shards: u32,
        f: usize,
        parts: Vec<(u32, Arc<Vec<String>>, Vec<f32>)>,
    ) -> Result<Catalog, WorkerError> {
        let mut ids = Vec::new();
        let mut factors = Vec::new();
        let mut lists = HashMap::new();
        for (shard, list, values) in parts {
            if values.len() != list.len() * f {
                return Err(WorkerError::Inconsistent {
                    job: job.to_string(),
                    detail: format!(
                        "item shard {shard}: {} ids but {} factor values ({f} per row)",
                        list.len(),
                        values.len()
                    ),
                });
            }
            lists.insert(shard, (ids.len() as u32, list.clone()));
            ids.extend(list.iter().cloned());
            factors.extend(values);
        }
        Ok(Catalog {
            ids,
            factors,
            lists,
            shards,
            lookup: HashMap::new(),
        })
    }

    /// From a model's item table (ids in table order, row-major factors).
    pub fn from_table(ids: Vec<String>, factors: Vec<f32>) -> Catalog {
        let lookup = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i as u32))
            .collect();
        Catalog {
            ids,
            factors,
            lists: HashMap::new(),
            shards: 1,
            lookup,
        }
    }

    /// The global index of an item id.
    pub fn index(&self, id: &str) -> Option<u32> {
        if !self.lookup.is_empty() {
            return self.lookup.get(id).copied();
        }
        let (start, list) = self
            .lists
            .get(&shoal_proto::hash::shard_of(id, self.shards))?;
        let pos = list.binary_search_by(|x| x.as_str().cmp(id)).ok()?;
        Some(start + pos as u32)
    }
}

/// Ranking quality on held-out pairs, as implicit's `ranking_metrics_at_k`
/// defines it: for each user with held-out items, the top `k` items (training
/// items excluded) against the held-out ones.
pub fn ranking_partial(top: &shoal_kernels::TopN, held: &[Vec<u32>]) -> pb::RankingPartial {
    let k = top.n;
    let mut out = pb::RankingPartial::default();
    for (u, likes) in held.iter().enumerate() {
        if likes.is_empty() {
            continue;
        }
        let relevant = k.min(likes.len());
        let mut hits = 0u64;
        let mut ap = 0.0;
        let mut dcg = 0.0;
        for (i, item) in top.items[u * k..(u + 1) * k].iter().enumerate() {
            if likes.binary_search(item).is_ok() {
                hits += 1;
                ap += hits as f64 / (i + 1) as f64;
                dcg += 1.0 / ((i + 2) as f64).log2();
            }
        }
        let idcg: f64 = (0..relevant).map(|i| 1.0 / ((i + 2) as f64).log2()).sum();
        out.users += 1;
        out.hits += hits;
        out.relevant += relevant as u64;
        out.average_precision += ap / relevant as f64;
        out.ndcg += dcg / idcg;
    }
    out
}

impl AlsJob {
    /// The training items of every user of `shard` in the catalog's order (the
    /// exclusion lists), and the held-out ones.
    fn seen_and_held(
        &self,
        job: &str,
        shard: u32,
        catalog: &Catalog,
    ) -> Result<(Csr, Vec<Vec<u32>>), WorkerError> {
        let owned = self.users.get(&shard).ok_or(WorkerError::UnknownShard {
            job: job.to_string(),
            shard,
        })?;
        let p = &owned.pairs;
        let missing = |id: &str| WorkerError::Inconsistent {
            job: job.to_string(),
            detail: format!("item `{id}` of user shard {shard} is in no item shard"),
        };
        // Items a model does not know (fold-in) cannot be recommended anyway.
        let global: Vec<Option<u32>> = p
            .others
            .iter()
            .map(|id| match catalog.index(id) {
                Some(i) => Ok(Some(i)),
                None if self.catalog.is_some() => Ok(None),
                None => Err(missing(id)),
            })
            .collect::<Result<_, _>>()?;
        let mut indptr = vec![0u64];
        let mut indices = Vec::with_capacity(p.nnz());
        let mut row = Vec::new();
        for r in 0..p.rows() {
            row.clear();
            row.extend(p.row(r).0.iter().filter_map(|&c| global[c as usize]));
            row.sort_unstable();
            indices.extend_from_slice(&row);
            indptr.push(indices.len() as u64);
        }
        let seen = Csr {
            rows: p.rows(),
            cols: catalog.ids.len(),
            indptr,
            values: vec![1.0; indices.len()],
            indices,
        };
        let mut held = vec![Vec::new(); p.rows()];
        for (r, id) in &p.held {
            held[*r as usize].push(catalog.index(id).ok_or_else(|| missing(id))?);
        }
        held.iter_mut().for_each(|h| h.sort_unstable());
        Ok((seen, held))
    }

    /// Recommendations (`top_n` items per user, the training items excluded when
    /// `exclude_seen`) and the ranking partial (`eval_k`, when items were held
    /// out) of one user shard.
    #[allow(clippy::too_many_arguments)]
    pub fn recommend(
        &self,
        job: &str,
        shard: u32,
        catalog: &Catalog,
        items: &Resident,
        top_n: usize,
        exclude_seen: bool,
        eval_k: usize,
        backend: &dyn Backend,
    ) -> Result<(Option<shoal_kernels::TopN>, Option<pb::RankingPartial>), WorkerError> {
        let x = self.resident(Side::Users, job, shard)?;
        let (seen, held) = self.seen_and_held(job, shard, catalog)?;
        let seen = backend.upload_sparse(&seen)?;
        let recs = (top_n > 0)
            .then(|| backend.top_n(x, items, top_n, exclude_seen.then_some(&seen)))
            .transpose()?;
        let ranking = if self.holdout > 0.0 && eval_k > 0 {
            let top = match &recs {
                Some(r) if exclude_seen && top_n == eval_k => r.clone(),
                _ => backend.top_n(x, items, eval_k, Some(&seen))?,
            };
            Some(ranking_partial(&top, &held))
        } else {
            None
        };
        Ok((recs, ranking))
    }

    /// Per segment, how many users of `shard` bought each item (every pair, held
    /// out or not), given each user's segment; sorted by (segment, item).
    pub fn segment_items(&self, shard: u32, segments: &[u32]) -> Vec<pb::SegmentItem> {
        let Some(owned) = self.users.get(&shard) else {
            return Vec::new();
        };
        let p = &owned.pairs;
        let mut counts: BTreeMap<(u32, &str), u64> = BTreeMap::new();
        for (r, &seg) in segments.iter().enumerate().take(p.rows()) {
            for &c in p.row(r).0 {
                *counts
                    .entry((seg, p.others[c as usize].as_str()))
                    .or_default() += 1;
            }
        }
        for (r, id) in &p.held {
            if let Some(&seg) = segments.get(*r as usize) {
                *counts.entry((seg, id.as_str())).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .map(|((segment, item), users)| pb::SegmentItem {
                segment,
                item: item.to_string(),
                users,
                label: p.labels.get(item).cloned().unwrap_or_default(),
            })
            .collect()
    }

    /// Fold-in: solves every user's factors with the model's item factors
    /// (`catalog`) fixed, from the same initial rows as training and with as many
    /// CG steps as training gave a row in all its iterations (at least one per
    /// factor), so a user the model was trained on lands close to where training
    /// put it (not exactly: training's last user step saw the previous item
    /// factors, and started warm).
    /// Pairs whose item the model does not know are left out (and counted).
    pub fn fold_in(
        &mut self,
        job: &str,
        catalog: Arc<Catalog>,
        backend: &dyn Backend,
    ) -> Result<Vec<pb::FoldInShard>, WorkerError> {
        let f = self.f;
        if catalog.factors.len() != catalog.ids.len() * f {
            return Err(WorkerError::Inconsistent {
                job: job.to_string(),
                detail: format!(
                    "{} factor values for {} model items of {f} factors",
                    catalog.factors.len(),
                    catalog.ids.len()
                ),
            });
        }
        let y = backend.upload(&catalog.factors, f)?;
        let gram = backend.gram(&y)?;
        let params = CgParams {
            regularization: self.spec.regularization as f32,
            cg_steps: (self.spec.iterations * self.spec.cg_steps).max(f as u32),
            pair_loss: false,
        };
        let mut out = Vec::new();
        for (&id, shard) in self.users.iter_mut() {
            let p = &shard.pairs;
            let global: Vec<Option<u32>> = p.others.iter().map(|o| catalog.index(o)).collect();
            let (csr, unknown) = als::confidence_rows(p, &global, catalog.ids.len(), &self.spec);
            let mut init = vec![0f32; p.rows() * f];
            for (r, uid) in p.ids.iter().enumerate() {
                als::initial_row(self.seed, Side::Users, uid, &mut init[r * f..(r + 1) * f]);
            }
            let mut x = backend.upload(&init, f)?;
            let conf = backend.upload_sparse(&csr)?;
            backend.als_solve(&mut x, &y, &gram, &conf, params)?;
            out.push(pb::FoldInShard {
                shard: id,
                pairs: csr.indices.len() as u64,
                unknown_item_pairs: unknown,
            });
            shard.conf = Some((csr, conf));
            shard.factors = Some(x);
        }
        self.catalog = Some(catalog);
        Ok(out)
    }

    /// Where the final item factors are: (owners, version) for fetching the catalog.
    pub fn catalog_source(&self, job: &str) -> Result<(Vec<String>, u32), WorkerError> {
        let l = self.linked(job)?;
        Ok((l.owners.clone(), l.item_version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A linked job of one user shard and one item shard, all on this worker.
    fn linked_job(shelf: &Shelf, backend: &dyn Backend) -> AlsJob {
        let rows = [
            ("u1", "a", 1.0),
            ("u1", "b", 2.0),
            ("u2", "b", 1.0),
            ("u3", "c", 3.0),
        ];
        let users = als::build_pairs(rows.iter().copied(), None, true, 1, 0.0).unwrap();
        let flipped: Vec<(&str, &str, f64)> = rows.iter().map(|&(u, i, s)| (i, u, s)).collect();
        let items = als::build_pairs(flipped.into_iter(), None, false, 1, 0.0).unwrap();
        let owned = |pairs| {
            BTreeMap::from([(
                0,
                OwnedShard {
                    pairs,
                    conf: None,
                    factors: None,
                },
            )])
        };
        let user_lists = HashMap::from([(0, Arc::new(users.ids.clone()))]);
        let item_lists = HashMap::from([(0, Arc::new(items.ids.clone()))]);
        shelf.put_ids("j", Side::Users, 0, user_lists[&0].clone());
        shelf.put_ids("j", Side::Items, 0, item_lists[&0].clone());
        let mut job = AlsJob {
            spec: AlsSpec {
                factors: 2,
                ..AlsSpec::default()
            },
            f: 2,
            seed: 1,
            holdout: 0.0,
            shards: 1,
            users: owned(users),
            items: owned(items),
            linked: None,
            top_n: 0,
            exclude_seen: true,
            eval_k: 10,
            catalog: None,
        };
        job.link(
            "j",
            vec!["here".into()],
            &item_lists,
            &user_lists,
            backend,
            shelf,
        )
        .unwrap();
        job
    }

    /// The rows `plan` asks for, from the shelf.
    fn fetch(shelf: &Shelf, plan: &FetchPlan) -> Vec<Vec<f32>> {
        plan.parts
            .iter()
            .map(|(shard, rows, _)| {
                let ticket = pb::FactorTicket {
                    job_id: "j".into(),
                    side: plan.side.other().to_proto(),
                    shard: *shard,
                    version: plan.version,
                    ids: false,
                    rows: rows.clone(),
                    runs: Vec::new(),
                };
                match shelf.answer(&ticket).unwrap() {
                    crate::flight::Answer::Rows { values, .. } => values,
                    other => panic!("{other:?}"),
                }
            })
            .collect()
    }

    #[test]
    fn a_failed_half_step_stops_every_later_one() {
        let (shelf, backend) = (Shelf::default(), shoal_kernels::CpuBackend::new());
        let mut job = linked_job(&shelf, &backend);
        // a good user half-step
        let plan = job.fetch_plan("j", Side::Users, 0).unwrap();
        let rows = fetch(&shelf, &plan);
        let gram = vec![1.0, 0.0, 0.0, 1.0];
        let done = job.step("j", &plan, rows, &gram, &backend, &shelf).unwrap();
        assert_eq!(done.len(), 1);
        // an item half-step whose solve fails (a Gram with NaN)
        let plan = job.fetch_plan("j", Side::Items, 0).unwrap();
        let rows = fetch(&shelf, &plan);
        let bad = vec![f64::NAN, 0.0, 0.0, 1.0];
        assert!(
            job.step("j", &plan, rows.clone(), &bad, &backend, &shelf)
                .is_err()
        );
        // neither side can go on from there, whatever the Gram
        let err = job
            .step("j", &plan, rows, &gram, &backend, &shelf)
            .unwrap_err();
        assert!(err.to_string().contains("run the job again"), "{err}");
        let err = job.fetch_plan("j", Side::Users, 1).unwrap_err();
        assert!(
            err.to_string().contains("items half-step 1 failed"),
            "{err}"
        );
    }

    #[test]
    fn ranking_metrics_follow_implicits_definitions() {
        // user 0: likes {1, 7}; top-3 = [7, 2, 1] -> hits at ranks 1 and 3
        // user 1: likes {4}; top-3 = [0, 5, 6] -> no hit
        // user 2: no held-out items -> not counted
        let top = shoal_kernels::TopN {
            n: 3,
            items: vec![7, 2, 1, 0, 5, 6, 1, 2, 3],
            scores: vec![0.0; 9],
        };
        let held = vec![vec![1, 7], vec![4], vec![]];
        let r = ranking_partial(&top, &held);
        assert_eq!((r.users, r.hits, r.relevant), (2, 2, 3));
        let ap0 = (1.0 + 2.0 / 3.0) / 2.0;
        assert!((r.average_precision - ap0).abs() < 1e-12);
        let dcg0 = 1.0 + 1.0 / 4f64.log2();
        let idcg0 = 1.0 + 1.0 / 3f64.log2();
        assert!((r.ndcg - dcg0 / idcg0).abs() < 1e-12);
    }

    #[test]
    fn catalog_indexes_follow_shard_order() {
        let shards = 4;
        let mut by_shard: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for i in 0..40 {
            let id = format!("item{i}");
            by_shard
                .entry(shoal_proto::hash::shard_of(&id, shards))
                .or_default()
                .push(id);
        }
        let parts: Vec<(u32, Arc<Vec<String>>, Vec<f32>)> = by_shard
            .into_iter()
            .map(|(s, mut ids)| {
                ids.sort();
                let n = ids.len();
                (s, Arc::new(ids), vec![0.0; n])
            })
            .collect();
        let catalog = Catalog::new("j", shards, 1, parts).unwrap();
        for (i, id) in catalog.ids.iter().enumerate() {
            assert_eq!(catalog.index(id), Some(i as u32));
        }
        assert_eq!(catalog.index("nope"), None);
    }
}
