//! The coordinator's durable state (`shoal coordinator --state URL`, a folder or
//! an object-store prefix): every job's record, and what each running job has
//! established, so that a restarted coordinator knows its jobs again, keeps the
//! queued ones in their order and resumes the running ones from their last
//! finished step.
//!
//! ```text
//! {state}/jobs/{job_id}/record.pb     StoredJob: spec, status, submission order
//! {state}/jobs/{job_id}/progress.pb   StoredProgress: attempt, ALS checkpoint,
//!                                     k-means centroids, Lloyd rounds
//! {state}/jobs/{job_id}/ingest.pb     StoredIngest: the splits' answers
//! ```
//!
//! One task writes, in the order the writes were asked for (a job's finished
//! record never lands before its submitted one); each object is one `put`, so a
//! coordinator killed mid-write leaves the previous version, never half of one.
//! What lives in staging (the shards, the ALS checkpoints) stays there until the
//! job ends.

use crate::CoordinatorError;
use prost::Message;
use shoal_proto::pb;
use shoal_spec::{JobId, JobSpec};
use shoal_store::{self as store, Location};
use std::collections::BTreeMap;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

enum Write {
    Put(String, bytes::Bytes),
    Delete(String),
    /// Answered once every write before it is done.
    Flush(oneshot::Sender<()>),
}

/// Where the coordinator keeps its state, and the writer that keeps it.
#[derive(Clone)]
pub struct Journal {
    root: Location,
    tx: mpsc::UnboundedSender<Write>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Journal({})", self.root.url())
    }
}

/// A job read back from the state.
pub struct Restored {
    pub id: JobId,
    pub spec: JobSpec,
    pub status: pb::JobStatus,
    pub sequence: u64,
    pub progress: Option<pb::StoredProgress>,
    pub ingest: Option<pb::StoredIngest>,
}

impl Journal {
    /// Opens the state at `url` (a folder is made when first written) and starts
    /// its writer (on the current Tokio runtime).
    pub fn open(url: &str) -> Result<Journal, CoordinatorError> {
        let root = store::resolve(url)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Write>();
        let at = root.clone();
        tokio::spawn(async move {
            while let Some(w) = rx.recv().await {
                match w {
                    Write::Put(rel, bytes) => {
                        if let Err(e) = at.child(&rel).put(bytes).await {
                            warn!(object = %at.child(&rel).url(), error = %e, "could not write the coordinator's state");
                        }
                    }
                    Write::Delete(rel) => {
                        if let Err(e) = at.child(&rel).delete().await {
                            warn!(object = %at.child(&rel).url(), error = %e, "could not remove from the coordinator's state");
                        }
                    }
                    Write::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Ok(Journal { root, tx })
    }

    pub fn url(&self) -> String {
        self.root.url()
    }

    fn put(&self, job: &JobId, name: &str, msg: &impl Message) {
        let _ = self.tx.send(Write::Put(
            format!("jobs/{job}/{name}"),
            bytes::Bytes::from(msg.encode_to_vec()),
        ));
    }

    /// Records a job: its spec, status and place in the submission order.
    pub fn record(&self, job: &JobId, spec: &JobSpec, status: &pb::JobStatus, sequence: u64) {
        let stored = pb::StoredJob {
            spec_toml: spec.to_toml(),
            status: Some(status.clone()),
            sequence,
        };
        self.put(job, "record.pb", &stored);
    }

    /// Records what a running job has established.
    pub fn progress(&self, job: &JobId, progress: &pb::StoredProgress) {
        self.put(job, "progress.pb", progress);
    }

    /// Records the answers of a job's ingest.
    pub fn ingest(&self, job: &JobId, ingest: &pb::StoredIngest) {
        self.put(job, "ingest.pb", ingest);
    }

    /// Forgets what a job needed to resume (it has ended); its record stays.
    pub fn ended(&self, job: &JobId) {
        for name in ["progress.pb", "ingest.pb"] {
            let _ = self.tx.send(Write::Delete(format!("jobs/{job}/{name}")));
        }
    }

    /// Waits until every write asked for so far is done.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Write::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Every job of the state, in submission order. An object that cannot be
    /// read is named in the error: the coordinator does not start on a state it
    /// would silently half-forget.
    pub async fn load(&self) -> Result<Vec<Restored>, CoordinatorError> {
        let jobs = self.root.child("jobs");
        let mut found: BTreeMap<String, BTreeMap<String, Location>> = BTreeMap::new();
        for meta in jobs.list().await? {
            let rel = jobs.relative(&meta.location);
            let Some((job, name)) = rel.split_once('/') else {
                continue;
            };
            found
                .entry(job.to_string())
                .or_default()
                .insert(name.to_string(), jobs.at(meta.location.clone()));
        }
        let mut restored = Vec::new();
        for (job, objects) in found {
            let Some(record) = objects.get("record.pb") else {
                continue;
            };
            let stored: pb::StoredJob = decode(record).await?;
            let spec = JobSpec::parse(&stored.spec_toml).map_err(|e| CoordinatorError::State {
                object: record.url(),
                reason: format!("its spec does not parse: {e}"),
            })?;
            let status = stored.status.ok_or_else(|| CoordinatorError::State {
                object: record.url(),
                reason: "no status".into(),
            })?;
            let progress = match objects.get("progress.pb") {
                Some(at) => Some(decode(at).await?),
                None => None,
            };
            let ingest = match objects.get("ingest.pb") {
                Some(at) => Some(decode(at).await?),
                None => None,
            };
            restored.push(Restored {
                id: JobId::from(job),
                spec,
                status,
                sequence: stored.sequence,
                progress,
                ingest,
            });
        }
        restored.sort_by_key(|r| r.sequence);
        Ok(restored)
    }
}

async fn decode<M: Message + Default>(at: &Location) -> Result<M, CoordinatorError> {
    let bytes = at.get().await?;
    M::decode(bytes).map_err(|e| CoordinatorError::State {
        object: at.url(),
        reason: format!("not a record of this shoal version ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_come_back_in_submission_order_with_their_progress() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().display().to_string()).unwrap();
        let spec = JobSpec::parse(
            "name = \"n\"\n[input]\ninteractions = \"/x.csv\"\n\
             [input.columns]\nuser = \"u\"\ntime = \"t\"\nitem = \"i\"\norder = \"o\"\n\
             quantity = \"q\"\nprice = \"p\"\n[output]\npath = \"/o\"\n",
        )
        .unwrap();
        let (a, b) = (
            JobId::from("job-b".to_string()),
            JobId::from("job-a".to_string()),
        );
        let status = |state: pb::JobState| pb::JobStatus {
            state: state as i32,
            ..Default::default()
        };
        journal.record(&a, &spec, &status(pb::JobState::Running), 1);
        journal.record(&b, &spec, &status(pb::JobState::Queued), 2);
        let progress = pb::StoredProgress {
            attempt: 2,
            fits: vec![pb::StoredFit {
                k: 1,
                rounds: 3,
                centroids: vec![1.0, 2.0],
                ..Default::default()
            }],
            ..Default::default()
        };
        journal.progress(&a, &progress);
        journal.ingest(&a, &pb::StoredIngest::default());
        journal.flush().await;
        let back = Journal::open(&dir.path().display().to_string())
            .unwrap()
            .load()
            .await
            .unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(
            (back[0].id.as_str(), back[1].id.as_str()),
            ("job-b", "job-a")
        );
        assert_eq!(back[0].progress.as_ref(), Some(&progress));
        assert!(back[0].ingest.is_some() && back[1].progress.is_none());
        assert_eq!(back[1].status.state, pb::JobState::Queued as i32);
        assert_eq!(back[0].spec, spec);
        journal.ended(&a);
        journal.flush().await;
        let back = journal.load().await.unwrap();
        assert!(back[0].progress.is_none() && back[0].ingest.is_none());
        // a record of something else is named, not skipped
        std::fs::write(dir.path().join("jobs/job-a/record.pb"), b"\xff\xff\xff").unwrap();
        let err = journal.load().await.err().unwrap();
        assert!(err.to_string().contains("record.pb"), "{err}");
    }
}
