//! A job's ALS state on one worker: the user and item shards it owns, their
//! confidence matrices and factors resident in the backend, the local copies of
//! the other side's rows they need, and the versions published.

use crate::WorkerError;
use crate::flight::Shelf;
use crate::steps::als::{self, KeyLists, Needed, Side};
use crate::steps::load::Pairs;
use arrow::array::{Array, StringArray};
use rayon::prelude::*;
use shoal_kernels::{Backend, CgParams, Csr, Resident};
use shoal_proto::pb;
use shoal_spec::hash::shard_of_key;
use shoal_spec::spec::AlsSpec;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

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

/// The job's linked ALS state, if `plan` is for the half-step it is at (another
/// call for the same half-step may have run in between) and its factors are usable.
fn linked_for<'a>(
    linked: &'a mut Option<Linked>,
    job: &str,
    plan: &FetchPlan,
) -> Result<&'a mut Linked, WorkerError> {
    let linked = linked.as_mut().ok_or_else(|| {
        WorkerError::InvalidRequest(format!("ALS of job {job} is not linked yet"))
    })?;
    usable(linked, job)?;
    let current = match plan.side {
        Side::Users => linked.user_version,
        Side::Items => linked.item_version,
    };
    if current != plan.own_version {
        return Err(WorkerError::StaleFactors {
            what: format!("{} factors of job {job}", plan.side.as_str()),
            have: current,
            wanted: plan.own_version,
        });
    }
    Ok(linked)
}

/// Every row of resident dense data, row-major.
fn download_all(backend: &dyn Backend, m: &Resident) -> Result<Vec<f32>, WorkerError> {
    Ok(Arc::unwrap_or_clone(backend.download_shared(m)?))
}

/// Where a link starts the factors: at their seeded values (iteration 0), or
/// at a checkpoint's (both sides' factors after `iteration` iterations, by side
/// and shard, for every shard this worker owns).
#[derive(Default)]
pub struct Resume {
    pub iteration: u32,
    pub factors: HashMap<(Side, u32), Vec<f32>>,
}

/// One shard of one side held by this worker.
pub struct OwnedShard {
    /// The shard's keys, by position.
    pub keys: Arc<Vec<u64>>,
    /// The pairs by key, until the job is linked (then they live on as `conf`).
    pub pairs: Option<Pairs>,
    /// The confidence matrix in the worker's local space of the other side (host
    /// copy for the exclusions and item counts, resident for the solve; the CPU
    /// backend shares one).
    pub conf: Option<(Arc<Csr>, Resident)>,
    pub factors: Option<Resident>,
    /// User side, once linked: the held-out pairs as (row, catalogue index).
    pub held: Vec<(u32, u32)>,
}

impl OwnedShard {
    pub fn new(keys: Arc<Vec<u64>>, pairs: Pairs) -> OwnedShard {
        OwnedShard {
            keys,
            pairs: Some(pairs),
            conf: None,
            factors: None,
            held: Vec::new(),
        }
    }

    pub fn rows(&self) -> usize {
        self.keys.len()
    }
}

/// The other side's rows a side of this worker needs, and their resident copy.
pub struct Local {
    pub needed: Needed,
    pub rows: Resident,
}

pub struct Linked {
    /// owners[s]: the address of the worker holding user shard s; item_owners[s]
    /// of item shard s.
    pub owners: Vec<String>,
    pub item_owners: Vec<String>,
    /// Where each item shard starts in the catalogue (its order: shard, position),
    /// and the catalogue's length.
    pub item_offsets: Vec<u64>,
    pub items: u64,
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
    /// The owners of the other side's shards.
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

    /// The shards of the other side that `side`'s pairs (training and held out)
    /// refer to.
    pub fn other_shards(&self, side: Side) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        for s in self.owned(side).values() {
            if let Some(p) = &s.pairs {
                out.extend(p.others.iter().map(|&k| shard_of_key(k, self.shards)));
                out.extend(p.held.iter().map(|&(_, k)| shard_of_key(k, self.shards)));
            }
        }
        out
    }

    fn linked(&self, job: &str) -> Result<&Linked, WorkerError> {
        let linked = self.linked.as_ref().ok_or_else(|| {
            WorkerError::InvalidRequest(format!("ALS of job {job} is not linked yet"))
        })?;
        usable(linked, job)?;
        Ok(linked)
    }

    /// Builds the confidence matrices and the initial factors, once the key lists
    /// of the other side's shards are known (`item_lists` for the user side,
    /// `user_lists` for the item side); publishes version 0 of every owned shard's
    /// factors (or, resuming, the checkpoint's at its iteration) and returns the
    /// Gram matrix of each owned item shard. The pairs by key are dropped: from
    /// here on the shards hold their matrices.
    #[allow(clippy::too_many_arguments)]
    pub fn link(
        &mut self,
        job: &str,
        owners: Vec<String>,
        item_owners: Vec<String>,
        item_shard_sizes: &[u64],
        item_lists: &KeyLists,
        user_lists: &KeyLists,
        backend: &dyn Backend,
        shelf: &Shelf,
        mut resume: Resume,
    ) -> Result<Vec<pb::GramPartial>, WorkerError> {
        let f = self.f;
        let version = resume.iteration;
        let mut item_offsets = Vec::with_capacity(item_shard_sizes.len());
        let mut at = 0u64;
        for &n in item_shard_sizes {
            item_offsets.push(at);
            at += n;
        }
        let mut locals = Vec::new();
        for (side, lists) in [(Side::Users, item_lists), (Side::Items, user_lists)] {
            let shards = self.shards;
            let owned = match side {
                Side::Users => &mut self.users,
                Side::Items => &mut self.items,
            };
            let lists = als::index_lists(lists);
            let (needed, cols) = {
                let pairs: Vec<&Pairs> = owned
                    .values()
                    .map(|s| s.pairs.as_ref().expect("linked once"))
                    .collect();
                als::link_columns(job, &pairs, shards, &lists)?
            };
            // shard by shard in parallel (the work inside each is serial)
            let seed = self.seed;
            let spec = &self.spec;
            let (width, lists, item_offsets) = (needed.rows.len(), &lists, &item_offsets);
            let owned: Vec<(u32, &mut OwnedShard, Option<Vec<f32>>)> = owned
                .iter_mut()
                .map(|(&id, s)| (id, s, resume.factors.remove(&(side, id))))
                .collect();
            if version > 0 && owned.iter().any(|(_, _, v)| v.is_none()) {
                return Err(WorkerError::InvalidRequest(format!(
                    "resuming ALS of job {job} at iteration {version} without the checkpoint of every {} shard this worker owns",
                    side.as_str()
                )));
            }
            owned.into_par_iter().zip(cols).try_for_each(
                |((id, shard, restored), cols)| -> Result<(), WorkerError> {
                    let pairs = shard.pairs.take().expect("linked once");
                    if side == Side::Users {
                        shard.held = pairs
                            .held
                            .iter()
                            .map(|&(r, k)| {
                                let (s, p) = als::locate(job, k, shards, lists)?;
                                Ok((r, (item_offsets[s as usize] + u64::from(p)) as u32))
                            })
                            .collect::<Result<_, WorkerError>>()?;
                    }
                    let csr = Arc::new(als::confidence_matrix(&pairs, cols, width, spec));
                    drop(pairs);
                    let resident = backend.upload_sparse_shared(csr.clone())?;
                    shard.conf = Some((csr, resident));
                    let init = restored.unwrap_or_else(|| {
                        let mut init = vec![0f32; shard.rows() * f];
                        for (r, &key) in shard.keys.iter().enumerate() {
                            als::initial_row(seed, side, key, &mut init[r * f..(r + 1) * f]);
                        }
                        init
                    });
                    let x = backend.upload(&init, f)?;
                    drop(init);
                    shelf.put_factors(
                        job,
                        side,
                        id,
                        &shard.keys,
                        version,
                        f,
                        backend.download_shared(&x)?,
                    )?;
                    shard.factors = Some(x);
                    Ok(())
                },
            )?;
            let rows = backend.zeros(needed.rows.len(), f)?;
            locals.push(Local { needed, rows });
        }
        let users_local = locals.pop().expect("two sides");
        let items_local = locals.pop().expect("two sides");
        self.linked = Some(Linked {
            owners,
            item_owners,
            item_offsets,
            items: at,
            items_local,
            users_local,
            user_version: version,
            item_version: version,
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
        let (own_version, local, version, owners) = match side {
            Side::Users => (
                linked.user_version,
                &linked.items_local,
                iteration,
                &linked.item_owners,
            ),
            Side::Items => (
                linked.item_version,
                &linked.users_local,
                iteration + 1,
                &linked.owners,
            ),
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
            owners: owners.clone(),
            parts: local.needed.by_shard(),
        })
    }

    /// Writes part `part` of `plan` (one shard's rows of the other side, as
    /// fetched) into the local copy, as soon as it arrives: a half-step never
    /// holds all the fetched rows besides the local copy.
    pub fn write_fetched(
        &mut self,
        job: &str,
        plan: &FetchPlan,
        part: usize,
        values: Vec<f32>,
        backend: &dyn Backend,
    ) -> Result<(), WorkerError> {
        let f = self.f;
        let linked = linked_for(&mut self.linked, job, plan)?;
        let local = match plan.side {
            Side::Users => &mut linked.items_local,
            Side::Items => &mut linked.users_local,
        };
        let Some((_, positions, first)) = plan.parts.get(part) else {
            return Err(WorkerError::InvalidRequest(format!(
                "part {part} of a fetch plan of {} parts",
                plan.parts.len()
            )));
        };
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
        backend.write_rows(&mut local.rows, &rows, &values)?;
        Ok(())
    }

    /// The half-step, once every part of `plan` is written
    /// ([`Self::write_fetched`]): solves every owned shard of `side` against the
    /// local copy and `gram` (the other side's Gram), publishes the new factors,
    /// and returns each shard's Gram matrix (and, for the item side, its data
    /// loss).
    pub fn step(
        &mut self,
        job: &str,
        plan: &FetchPlan,
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
        let linked = linked_for(&mut self.linked, job, plan)?;
        let version = plan.own_version + 1;
        let (owned, local) = match plan.side {
            Side::Users => (&mut self.users, &mut linked.items_local),
            Side::Items => (&mut self.items, &mut linked.users_local),
        };
        // No one reads this side while its half-step runs: the served copies
        // go, so that the backend can solve its own in place.
        for &id in owned.keys() {
            shelf.retire_factors(job, plan.side, id);
        }
        // The shards are solved side by side (each solve is parallel inside too):
        // a worker's few small shards would otherwise leave cores idle at the end
        // of each one.
        let started = std::time::Instant::now();
        let local_rows = &local.rows;
        // each shard's Gram partial and its new factors, as the shelf serves them
        type Solved = (pb::GramPartial, Arc<Vec<f32>>);
        let results: Vec<Result<Solved, WorkerError>> = owned
            .par_iter_mut()
            .map(|(&id, shard)| {
                let (_, conf) = shard.conf.as_ref().expect("linked shards have confidences");
                let x = shard.factors.as_mut().expect("linked shards have factors");
                let pair_loss = backend.als_solve(x, local_rows, gram, conf, params)?;
                let host = backend.download_shared(x)?;
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
            let keys = &owned[&id].keys;
            shelf.put_factors(job, plan.side, id, keys, version, f, host)?;
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

    /// Frees what only the half-steps need, once they are over: the copies of
    /// the other side's rows and the item shards' confidence matrices (the user
    /// side's stay: the recommendations and item counts read them).
    pub fn end_training(&mut self, backend: &dyn Backend) -> Result<(), WorkerError> {
        let f = self.f;
        if let Some(l) = self.linked.as_mut() {
            l.users_local.rows = backend.zeros(0, f)?;
            l.items_local.rows = backend.zeros(0, f)?;
        }
        for shard in self.items.values_mut() {
            shard.conf = None;
        }
        Ok(())
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
    pub fn resident(&self, side: Side, job: &str, shard: u32) -> Result<&Resident, WorkerError> {
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

    /// The catalogue's length: every item of the job (or of the fold-in's model).
    pub fn catalog_items(&self) -> u64 {
        match (&self.catalog, &self.linked) {
            (Some(c), _) => c.len() as u64,
            (None, Some(l)) => l.items,
            (None, None) => 0,
        }
    }

    /// The items of every user of `shard` in the catalogue's order, training
    /// pairs (sorted, as a matrix of catalogue columns) and held-out ones
    /// (sorted, per row).
    pub fn seen_and_held(
        &self,
        job: &str,
        shard: u32,
    ) -> Result<(Csr, Vec<Vec<u32>>), WorkerError> {
        let owned = self.users.get(&shard).ok_or(WorkerError::UnknownShard {
            job: job.to_string(),
            shard,
        })?;
        let (conf, _) = owned.conf.as_ref().ok_or_else(|| {
            WorkerError::InvalidRequest(format!("ALS of job {job} is not linked yet"))
        })?;
        let items = self.catalog_items();
        // a fold-in's columns are catalogue indices already
        let global: Option<Vec<u32>> = match (&self.catalog, &self.linked) {
            (Some(_), _) => None,
            (None, Some(l)) => Some(
                l.items_local
                    .needed
                    .rows
                    .iter()
                    .map(|&(s, p)| (l.item_offsets[s as usize] + u64::from(p)) as u32)
                    .collect(),
            ),
            (None, None) => {
                return Err(WorkerError::InvalidRequest(format!(
                    "ALS of job {job} is not linked yet"
                )));
            }
        };
        let indices = match &global {
            // local columns follow the catalogue's order: still sorted per row
            Some(g) => conf.indices.iter().map(|&c| g[c as usize]).collect(),
            None => conf.indices.clone(),
        };
        let seen = Csr {
            rows: conf.rows,
            cols: items as usize,
            indptr: conf.indptr.clone(),
            values: vec![1.0; indices.len()],
            indices,
        };
        let mut held = vec![Vec::new(); conf.rows];
        for &(r, i) in &owned.held {
            held[r as usize].push(i);
        }
        held.iter_mut().for_each(|h| h.sort_unstable());
        Ok((seen, held))
    }

    /// Adds, per segment and catalogue item, the users of `shard` who bought it
    /// (training and held-out pairs) to `counts` (`k x catalogue items`,
    /// row-major), given each user's segment.
    pub fn count_segment_items(
        &self,
        job: &str,
        shard: u32,
        segments: &[u32],
        counts: &mut [u64],
    ) -> Result<(), WorkerError> {
        let (seen, held) = self.seen_and_held(job, shard)?;
        let items = seen.cols;
        for (r, &seg) in segments.iter().enumerate().take(seen.rows) {
            let row = &mut counts[seg as usize * items..(seg as usize + 1) * items];
            for &i in seen.row(r).0.iter().chain(&held[r]) {
                row[i as usize] += 1;
            }
        }
        Ok(())
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
        if catalog.factors.len() != catalog.len() * f {
            return Err(WorkerError::Inconsistent {
                job: job.to_string(),
                detail: format!(
                    "{} factor values for {} model items of {f} factors",
                    catalog.factors.len(),
                    catalog.len()
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
            let Some(p) = shard.pairs.take() else {
                continue;
            };
            let (csr, unknown) =
                als::confidence_rows(&p, |k| catalog.index(k), catalog.len(), &self.spec);
            shard.held = p
                .held
                .iter()
                .filter_map(|&(r, k)| catalog.index(k).map(|i| (r, i)))
                .collect();
            let mut init = vec![0f32; shard.rows() * f];
            for (r, &key) in shard.keys.iter().enumerate() {
                als::initial_row(self.seed, Side::Users, key, &mut init[r * f..(r + 1) * f]);
            }
            let mut x = backend.upload(&init, f)?;
            let csr = Arc::new(csr);
            let conf = backend.upload_sparse_shared(csr.clone())?;
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

    /// Where the final item factors are: (item owners, version, item shard
    /// sizes) for fetching the catalogue.
    pub fn catalog_source(&self, job: &str) -> Result<(Vec<String>, u32), WorkerError> {
        let l = self.linked(job)?;
        Ok((l.item_owners.clone(), l.item_version))
    }
}

/// One item shard's part of the catalogue: shard, keys, ids, factors.
pub type CatalogPart = (u32, Arc<Vec<u64>>, StringArray, Vec<f32>);

/// Every item of the job in the catalogue's order (item shard, position): ids and
/// final factors, fetched once for recommendations and evaluation; or a fold-in
/// model's items in its table's order.
pub struct Catalog {
    pub ids: StringArray,
    pub factors: Vec<f32>,
    /// For a model's catalogue: item key -> index.
    lookup: HashMap<u64, u32>,
    /// For the job's own: where each item shard starts, and its keys.
    shards: Vec<(u64, Arc<Vec<u64>>)>,
    shard_count: u32,
}

impl Catalog {
    /// From each item shard's keys, ids and factors (`f` per row), in shard order.
    pub fn new(job: &str, f: usize, parts: Vec<CatalogPart>) -> Result<Catalog, WorkerError> {
        let shard_count = parts.len() as u32;
        let mut ids = arrow::array::StringBuilder::new();
        let mut factors = Vec::new();
        let mut shards = Vec::with_capacity(parts.len());
        let mut at = 0u64;
        for (s, (shard, keys, list, values)) in parts.into_iter().enumerate() {
            if shard as usize != s || values.len() != list.len() * f || keys.len() != list.len() {
                return Err(WorkerError::Inconsistent {
                    job: job.to_string(),
                    detail: format!(
                        "item shard {shard} (the {s}th): {} keys, {} ids, {} factor values ({f} per row)",
                        keys.len(),
                        list.len(),
                        values.len()
                    ),
                });
            }
            shards.push((at, keys));
            at += list.len() as u64;
            for v in list.iter() {
                ids.append_option(v);
            }
            factors.extend(values);
        }
        Ok(Catalog {
            ids: ids.finish(),
            factors,
            lookup: HashMap::new(),
            shards,
            shard_count,
        })
    }

    /// From a model's item table (ids in table order, row-major factors).
    pub fn from_table(ids: StringArray, factors: Vec<f32>) -> Catalog {
        let lookup = (0..ids.len())
            .map(|i| (shoal_spec::hash::id_key(ids.value(i)), i as u32))
            .collect();
        Catalog {
            ids,
            factors,
            lookup,
            shards: Vec::new(),
            shard_count: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The catalogue index of the item with key `key`.
    pub fn index(&self, key: u64) -> Option<u32> {
        if self.shard_count == 0 {
            return self.lookup.get(&key).copied();
        }
        let (start, keys) = &self.shards[shard_of_key(key, self.shard_count) as usize];
        let pos = keys.binary_search(&key).ok()?;
        Some((start + pos as u64) as u32)
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_spec::hash::id_key;

    fn pairs(rows: &[(&str, &[(&str, f64)])], shards: u32) -> (Arc<Vec<u64>>, Pairs) {
        let mut rows: Vec<(u64, Vec<(u64, f64)>)> = rows
            .iter()
            .map(|(own, others)| {
                let mut o: Vec<(u64, f64)> = others.iter().map(|(k, s)| (id_key(k), *s)).collect();
                o.sort_by_key(|&(k, _)| (shard_of_key(k, shards), k));
                (id_key(own), o)
            })
            .collect();
        rows.sort_by_key(|r| r.0);
        let mut p = Pairs {
            indptr: vec![0],
            ..Pairs::default()
        };
        for (_, o) in &rows {
            p.others.extend(o.iter().map(|e| e.0));
            p.strength.extend(o.iter().map(|e| e.1));
            p.indptr.push(p.others.len() as u64);
        }
        (Arc::new(rows.iter().map(|r| r.0).collect()), p)
    }

    /// A linked job of one user shard and one item shard, all on this worker.
    fn linked_job(shelf: &Shelf, backend: &dyn Backend) -> AlsJob {
        let (ukeys, upairs) = pairs(
            &[
                ("u1", &[("a", 1.0), ("b", 2.0)]),
                ("u2", &[("b", 1.0)]),
                ("u3", &[("c", 3.0)]),
            ],
            1,
        );
        let (ikeys, ipairs) = pairs(
            &[
                ("a", &[("u1", 1.0)]),
                ("b", &[("u1", 2.0), ("u2", 1.0)]),
                ("c", &[("u3", 3.0)]),
            ],
            1,
        );
        let user_lists: KeyLists = HashMap::from([(0, ukeys.clone())]);
        let item_lists: KeyLists = HashMap::from([(0, ikeys.clone())]);
        shelf.put_keys("j", Side::Users, 0, ukeys.clone(), None);
        shelf.put_keys("j", Side::Items, 0, ikeys.clone(), None);
        let mut job = AlsJob {
            spec: AlsSpec {
                factors: 2,
                ..AlsSpec::default()
            },
            f: 2,
            seed: 1,
            holdout: 0.0,
            shards: 1,
            users: BTreeMap::from([(0, OwnedShard::new(ukeys, upairs))]),
            items: BTreeMap::from([(0, OwnedShard::new(ikeys, ipairs))]),
            linked: None,
            top_n: 0,
            exclude_seen: true,
            eval_k: 10,
            catalog: None,
        };
        job.link(
            "j",
            vec!["here".into()],
            vec!["here".into()],
            &[3],
            &item_lists,
            &user_lists,
            backend,
            shelf,
            Resume::default(),
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
                    keys: false,
                };
                match shelf.answer(&ticket).unwrap() {
                    crate::flight::Answer::Rows { values, .. } => values,
                    other => panic!("{other:?}"),
                }
            })
            .collect()
    }

    /// Writes what `plan` asks for into the local copy, part by part.
    fn write_all(job: &mut AlsJob, shelf: &Shelf, plan: &FetchPlan, backend: &dyn Backend) {
        for (part, values) in fetch(shelf, plan).into_iter().enumerate() {
            job.write_fetched("j", plan, part, values, backend).unwrap();
        }
    }

    #[test]
    fn a_failed_half_step_stops_every_later_one() {
        let (shelf, backend) = (Shelf::default(), shoal_kernels::CpuBackend::new());
        let mut job = linked_job(&shelf, &backend);
        // a good user half-step
        let plan = job.fetch_plan("j", Side::Users, 0).unwrap();
        write_all(&mut job, &shelf, &plan, &backend);
        let gram = vec![1.0, 0.0, 0.0, 1.0];
        let done = job.step("j", &plan, &gram, &backend, &shelf).unwrap();
        assert_eq!(done.len(), 1);
        // an item half-step whose solve fails (a Gram with NaN)
        let plan = job.fetch_plan("j", Side::Items, 0).unwrap();
        write_all(&mut job, &shelf, &plan, &backend);
        let bad = vec![f64::NAN, 0.0, 0.0, 1.0];
        assert!(job.step("j", &plan, &bad, &backend, &shelf).is_err());
        // neither side can go on from there, whatever the Gram
        let err = job.step("j", &plan, &gram, &backend, &shelf).unwrap_err();
        assert!(err.to_string().contains("run the job again"), "{err}");
        let values = fetch(&shelf, &plan).swap_remove(0);
        let err = job
            .write_fetched("j", &plan, 0, values, &backend)
            .unwrap_err();
        assert!(err.to_string().contains("run the job again"), "{err}");
        let err = job.fetch_plan("j", Side::Users, 1).unwrap_err();
        assert!(
            err.to_string().contains("items half-step 1 failed"),
            "{err}"
        );
    }

    #[test]
    fn seen_items_are_catalogue_indices_and_segment_counts_add_up() {
        let (shelf, backend) = (Shelf::default(), shoal_kernels::CpuBackend::new());
        let job = linked_job(&shelf, &backend);
        let (seen, held) = job.seen_and_held("j", 0).unwrap();
        seen.validate().unwrap();
        assert_eq!(seen.cols, 3);
        assert_eq!(seen.indices.len(), 4);
        assert!(held.iter().all(Vec::is_empty));
        // 2 segments: the first user in segment 1, the others in 0
        let mut counts = vec![0u64; 2 * 3];
        job.count_segment_items("j", 0, &[1, 0, 0], &mut counts)
            .unwrap();
        assert_eq!(counts.iter().sum::<u64>(), 4);
        let first_user_items = seen.row(0).0.len() as u64;
        assert_eq!(counts[3..].iter().sum::<u64>(), first_user_items);
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
        let mut by_shard: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
        for i in 0..40 {
            let id = format!("item{i}");
            by_shard
                .entry(shard_of_key(id_key(&id), shards))
                .or_default()
                .push((id_key(&id), id));
        }
        let parts: Vec<CatalogPart> = by_shard
            .into_iter()
            .map(|(s, mut ids)| {
                ids.sort();
                let n = ids.len();
                (
                    s,
                    Arc::new(ids.iter().map(|e| e.0).collect()),
                    StringArray::from_iter_values(ids.iter().map(|e| e.1.as_str())),
                    vec![0.0; n],
                )
            })
            .collect();
        let catalog = Catalog::new("j", 1, parts).unwrap();
        for i in 0..catalog.len() {
            assert_eq!(catalog.index(id_key(catalog.ids.value(i))), Some(i as u32));
        }
        assert_eq!(catalog.index(id_key("nope")), None);
        let table = Catalog::from_table(StringArray::from(vec!["x", "y"]), vec![0.0, 1.0]);
        assert_eq!(table.index(id_key("y")), Some(1));
    }
}
