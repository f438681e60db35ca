//! The job's driver: runs the phases in order, and recovers when a step fails in
//! a way a retry can mend.
//!
//! What a phase establishes is kept in [`Facts`] across attempts: the ingested
//! splits (ingest is idempotent: a split's staged objects are named by split and
//! chunk and hold the same rows whoever writes them), the load's statistics, the
//! ALS iterations up to the last checkpoint, the scaling, the k-means||
//! centroids and every finished Lloyd round. What lives on the workers (loaded
//! shards, factors, resident points, bounds) is [`OnWorkers`]: after a recovery
//! it is rebuilt on the new placement from staging and the last checkpoint.
//! Every reduction runs in shard order and every shard holds the same data
//! wherever it is loaded, so a recovered job writes the outputs an undisturbed
//! one would, bit for bit.

use super::crew::{self, Crew, Member};
use super::phases::{self, Facts};
use super::placement::Placement;
use super::{Attempt, JobContext, Phase, Step};
use crate::CoordinatorError;
use crate::output::PhaseTimes;
use crate::state::Progress;
use futures::future::try_join_all;
use shoal_net::auth::{AuthChannel, WithToken};
use shoal_proto::pb;
use shoal_proto::pb::worker_service_client::WorkerServiceClient;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Instant;
use tracing::{info, warn};

/// What the current attempt has built on its workers.
#[derive(Debug, Default, Clone, Copy)]
pub(in crate::job) struct OnWorkers {
    pub loaded: bool,
    /// ALS linked and run to its last iteration (or folded in).
    pub als: bool,
    pub scaled: bool,
}

pub(in crate::job) struct Driver<'a> {
    pub ctx: &'a JobContext,
    pub crew: Vec<Member>,
    slot: &'a Mutex<Crew>,
    pub shards: u32,
    /// Where the shards are, once ingest has sized them (again after a recovery).
    pub placement: Option<Placement>,
    pub attempt: Attempt,
    /// The step running (for the count of its attempts).
    pub step: Step,
    pub on: OnWorkers,
    pub times: PhaseTimes,
    pub started: Instant,
    token: WithToken,
    /// Failures per step so far.
    failures: BTreeMap<Step, u32>,
}

impl Driver<'_> {
    pub fn progress(&self, p: Progress) {
        self.ctx.state.progress(&self.ctx.id, p);
    }

    /// Enters `phase` (its first step).
    pub fn phase(&mut self, phase: Phase) {
        tracing::Span::current().record("phase", phase.as_str());
        info!(phase = phase.as_str(), attempt = self.attempt.0, "phase");
        self.step = Step::of(phase);
        self.progress(Progress {
            phase: Some(phase.as_str()),
            ..Default::default()
        });
    }

    pub fn placement(&self) -> &Placement {
        self.placement
            .as_ref()
            .expect("shards are placed after ingest, before any step that uses them")
    }

    /// The member holding `shard` (user shard and item shard of that index).
    pub fn owner(&self, shard: u32) -> usize {
        self.placement().owner[shard as usize]
    }

    pub fn shards_of(&self, member: usize) -> Vec<u32> {
        self.placement().shards_of(member)
    }

    /// Calls every member concurrently; answers come back in member order.
    pub async fn all<T, F, Fut>(&self, f: F) -> Result<Vec<T>, CoordinatorError>
    where
        F: Fn(usize, WorkerServiceClient<AuthChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let f = &f;
        let step = self.step.phase.as_str();
        try_join_all(
            self.crew
                .iter()
                .enumerate()
                .map(|(i, m)| m.call(step, move |c| f(i, c))),
        )
        .await
    }

    pub fn job_id(&self) -> String {
        self.ctx.id.to_string()
    }

    /// The job as ingest and load requests carry it.
    pub fn job_context(&self, facts: &Facts) -> pb::JobContext {
        pb::JobContext {
            job_id: self.job_id(),
            spec_toml: self.ctx.spec.to_toml(),
            staging: facts.plan.staging.url(),
        }
    }

    /// Records what the job has established in the coordinator's state, when
    /// it has one.
    pub fn save(&self, facts: &Facts) {
        if let Some(journal) = &self.ctx.state.config.journal {
            journal.progress(&self.ctx.id, &facts.stored(self.attempt));
        }
    }

    /// [`Self::save`], and waits until it is written (before something the
    /// older record needs is removed).
    pub async fn save_now(&self, facts: &Facts) {
        self.save(facts);
        if let Some(journal) = &self.ctx.state.config.journal {
            journal.flush().await;
        }
    }

    fn publish_crew(&self) {
        self.slot.lock().expect("crew lock").members = self.crew.clone();
    }

    /// After a failure of the current step: a failure a retry cannot mend, or
    /// one more than `cluster.max_attempts` allows, ends the job. Otherwise the
    /// workers that are gone (unregistered, or not answering) leave the crew,
    /// workers registered since join it (with none left, it waits for one as
    /// long as a job waits for its first), and the job goes on with the next
    /// attempt: its shards placed again, the steps that lived on the workers
    /// rebuilt.
    async fn recover(
        &mut self,
        failed: CoordinatorError,
        facts: &Facts,
    ) -> Result<(), CoordinatorError> {
        if !failed.is_retryable() || self.ctx.cancel.is_cancelled() {
            return Err(failed);
        }
        let since = Instant::now();
        let step = self.step;
        let tries = {
            let n = self.failures.entry(step).or_insert(0);
            *n += 1;
            *n
        };
        let alive =
            futures::future::join_all(self.crew.iter().map(|m| m.alive(&self.ctx.id))).await;
        let lost_at: Vec<usize> = (0..alive.len()).filter(|&i| !alive[i]).collect();
        let lost_text = self.describe_lost(&lost_at);
        let mut lost: Vec<Member> = Vec::new();
        for (m, alive) in std::mem::take(&mut self.crew).into_iter().zip(alive) {
            if alive {
                self.crew.push(m);
            } else {
                lost.push(m);
            }
        }
        self.slot
            .lock()
            .expect("crew lock")
            .dropped
            .extend(lost.iter().cloned());
        let max = self.ctx.spec.cluster.max_attempts;
        if tries >= max {
            self.publish_crew();
            return Err(CoordinatorError::StepFailed {
                step: step.to_string(),
                attempts: tries,
                max,
                lost: lost_text,
                cause: Box::new(failed),
            });
        }
        self.recruit().await?;
        self.attempt = Attempt(self.attempt.0 + 1);
        self.placement = None;
        self.on = OnWorkers::default();
        // written before any worker hears of the attempt
        self.save_now(facts).await;
        tracing::Span::current().record("attempt", self.attempt.0);
        let names: Vec<String> = self.crew.iter().map(|m| m.worker.id.to_string()).collect();
        let text = format!(
            "attempt {}: {step} failed ({failed}){lost_text}; going on with {}",
            self.attempt,
            names.join(", ")
        );
        warn!(
            attempt = self.attempt.0,
            step = %step,
            workers = self.crew.len(),
            ms = since.elapsed().as_millis() as u64,
            error = %failed,
            "recovering: {text}"
        );
        self.ctx.state.config.metrics.recovered();
        self.progress(Progress {
            attempt: Some(self.attempt.0),
            recovery: Some(text),
            workers: Some(self.crew.len() as u32),
            ..Default::default()
        });
        Ok(())
    }

    /// ", losing worker-1 (shards 0, 3)" for the members at `lost` (indices of
    /// the crew), or "".
    fn describe_lost(&self, lost: &[usize]) -> String {
        let parts: Vec<String> = lost
            .iter()
            .map(|&i| {
                let id = &self.crew[i].worker.id;
                match &self.placement {
                    Some(p) => {
                        let shards: Vec<String> =
                            p.shards_of(i).iter().map(|s| s.to_string()).collect();
                        format!("{id} (shards {})", shards.join(", "))
                    }
                    None => id.to_string(),
                }
            })
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(", losing {}", parts.join(", "))
        }
    }

    /// Takes in the workers registered since the crew was formed (never one
    /// the job dropped); with no member left, waits for one.
    async fn recruit(&mut self) -> Result<(), CoordinatorError> {
        let known: Vec<_> = {
            let slot = self.slot.lock().expect("crew lock");
            self.crew
                .iter()
                .chain(&slot.dropped)
                .map(|m| m.worker.id.clone())
                .collect()
        };
        let state = &self.ctx.state;
        let fresh = if self.crew.is_empty() {
            info!("no worker of the job is left; waiting for one to register");
            crew::wait_for_workers(state, &known).await?
        } else {
            state
                .workers()
                .await?
                .into_iter()
                .filter(|w| !known.contains(&w.id))
                .collect()
        };
        let ca = state.config.tls_ca.as_deref();
        for w in fresh {
            let id = w.id.clone();
            match crew::connect(w, self.token.clone(), ca, state.clone()).await {
                Ok(m) => {
                    info!(worker = %id, "a worker joins the job");
                    self.crew.push(m);
                }
                Err(e) => warn!(worker = %id, error = %e, "could not take a new worker in"),
            }
        }
        if self.crew.is_empty() {
            return Err(CoordinatorError::NoWorkers {
                seconds: state.config.worker_wait.as_secs(),
            });
        }
        self.publish_crew();
        Ok(())
    }
}

/// Plans the job, forms its crew, and runs the phases until the outputs are
/// written, recovering from failures a retry can mend.
pub(super) async fn drive(
    ctx: &JobContext,
    slot: &Mutex<Crew>,
    committing: &AtomicBool,
) -> Result<(), CoordinatorError> {
    let started = Instant::now();
    let mut times = PhaseTimes::default();
    let t = Instant::now();
    ctx.state.progress(
        &ctx.id,
        Progress {
            phase: Some(Phase::Plan.as_str()),
            attempt: Some(1),
            ..Default::default()
        },
    );
    let plan = phases::plan::run(ctx).await?;
    let workers = crew::wait_for_workers(&ctx.state, &[]).await?;
    let token = WithToken::new(ctx.state.config.worker_token.as_deref()).map_err(|reason| {
        CoordinatorError::BadToken {
            which: "SHOAL_WORKER_TOKEN",
            reason,
        }
    })?;
    let ca = ctx.state.config.tls_ca.as_deref();
    let crew = try_join_all(
        workers
            .into_iter()
            .map(|w| crew::connect(w, token.clone(), ca, ctx.state.clone())),
    )
    .await?;
    times.add("plan", t);
    let mut d = Driver {
        ctx,
        crew,
        slot,
        shards: ctx.spec.cluster.shards,
        placement: None,
        attempt: Attempt(1),
        step: Step::of(Phase::Plan),
        on: OnWorkers::default(),
        times,
        started,
        token,
        failures: BTreeMap::new(),
    };
    d.publish_crew();
    tracing::Span::current().record("attempt", 1);
    d.progress(Progress {
        workers: Some(d.crew.len() as u32),
        ..Default::default()
    });
    let mut facts = Facts::new(plan);
    if let Some(resume) = &ctx.resume {
        // The workers may still hold the attempt the stopped coordinator ran:
        // this one goes past it.
        let last = resume.progress.as_ref().map_or(1, |p| p.attempt);
        d.attempt = Attempt(last + 1);
        tracing::Span::current().record("attempt", d.attempt.0);
        let from = facts.restore(resume);
        let text = format!(
            "attempt {}: resumed {from} after the coordinator restarted",
            d.attempt
        );
        info!(attempt = d.attempt.0, "{text}");
        d.progress(Progress {
            attempt: Some(d.attempt.0),
            recovery: Some(text),
            ..Default::default()
        });
    }
    d.save(&facts);
    loop {
        match phases::advance(&mut d, &mut facts, committing).await {
            Ok(()) => return Ok(()),
            Err(e) => d.recover(e, &facts).await?,
        }
    }
}
