//! The operators' side of the JobService: submit, watch with progress, cancel,
//! list, and the segment table printed at the end.

use crate::watch::{self, EXIT_CANCELLED, View, is_finished, state_name};
use shoal_net::auth::{AuthChannel, WithToken};
use shoal_net::tls;
use shoal_proto::pb::job_service_client::JobServiceClient;
use shoal_proto::pb::{
    GetJobRequest, JobState, JobStatus, ListJobsRequest, ListWorkersRequest, SubmitJobRequest,
};
use shoal_spec::JobSpec;
use shoal_spec::manifest::{MANIFEST, Manifest};
use shoal_store as store;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct Client {
    inner: JobServiceClient<AuthChannel>,
}

impl Client {
    /// Connects to the coordinator at `url`; every call carries `token`. For an
    /// `https://` URL the coordinator's certificate is checked against the system's
    /// roots and the CA certificate `ca`, if given.
    pub async fn connect(
        url: &str,
        token: Option<&str>,
        ca: Option<&Path>,
    ) -> Result<Client, BoxError> {
        let token = WithToken::new(token).map_err(|e| format!("SHOAL_TOKEN: {e}"))?;
        let channel = tls::endpoint(url, ca)
            .map_err(|e| format!("the coordinator URL: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("cannot reach the coordinator at {url}: {e}"))?;
        Ok(Client {
            inner: JobServiceClient::with_interceptor(channel, token),
        })
    }

    pub async fn submit(&mut self, spec: &JobSpec) -> Result<String, BoxError> {
        let resp = self
            .inner
            .submit_job(SubmitJobRequest {
                spec_toml: spec.to_toml(),
            })
            .await
            .map_err(|s| format!("the coordinator refused the job: {}", s.message()))?;
        Ok(resp.into_inner().job_id)
    }

    pub async fn status(&mut self, job: &str) -> Result<JobStatus, BoxError> {
        let resp = self
            .inner
            .get_job(GetJobRequest {
                job_id: job.to_string(),
            })
            .await
            .map_err(|s| s.message().to_string())?;
        Ok(resp.into_inner())
    }

    /// Polls until `n` workers are registered.
    pub async fn wait_for_workers(
        &mut self,
        n: usize,
        limit: Duration,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let deadline = Instant::now() + limit;
        loop {
            let have = self
                .inner
                .list_workers(ListWorkersRequest {})
                .await?
                .into_inner()
                .workers
                .len();
            if have >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {have} of {n} workers registered within {} s",
                    limit.as_secs()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Follows the job until it ends, showing its progress: a bar per phase on a
    /// terminal, one plain line per change otherwise (see [`View`]).
    pub async fn watch(&mut self, job: &str) -> Result<JobStatus, BoxError> {
        let mut stream = self
            .inner
            .watch_job(GetJobRequest {
                job_id: job.to_string(),
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let mut view = View::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last = None;
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(status)) => {
                        view.show(&status);
                        last = Some(status);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        view.end(None);
                        return Err(format!("the watch of {job} broke off: {}", e.message()).into());
                    }
                },
                _ = tick.tick() => view.tick(),
            }
        }
        view.end(last.as_ref());
        match last {
            Some(s) => Ok(s),
            None => {
                Err(format!("the coordinator ended the watch of {job} without a status").into())
            }
        }
    }

    /// Asks the coordinator to cancel the job; its status right after.
    pub async fn cancel(&mut self, job: &str) -> Result<JobStatus, BoxError> {
        let resp = self
            .inner
            .cancel_job(GetJobRequest {
                job_id: job.to_string(),
            })
            .await
            .map_err(|s| s.message().to_string())?;
        Ok(resp.into_inner())
    }

    /// Every job the coordinator knows, oldest first.
    pub async fn jobs(&mut self) -> Result<Vec<JobStatus>, BoxError> {
        let resp = self
            .inner
            .list_jobs(ListJobsRequest {})
            .await
            .map_err(|s| s.message().to_string())?;
        Ok(resp.into_inner().jobs)
    }

    /// Follows the job without showing anything until it ends or `limit` passes;
    /// the last status seen.
    pub async fn wait_quietly(
        &mut self,
        job: &str,
        limit: Duration,
    ) -> Result<JobStatus, BoxError> {
        let mut stream = self
            .inner
            .watch_job(GetJobRequest {
                job_id: job.to_string(),
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = None;
        loop {
            match tokio::time::timeout_at(deadline, stream.message()).await {
                Ok(Ok(Some(status))) => last = Some(status),
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(e)) => {
                    return Err(format!("the watch of {job} broke off: {}", e.message()).into());
                }
            }
        }
        match last {
            Some(s) => Ok(s),
            None => self.status(job).await,
        }
    }

    /// `shoal cancel`: cancels the job and waits up to `limit` for it to stop.
    /// Exit code 0 when the job is cancelled, or had already finished (said so);
    /// 1 when it is still stopping after `limit`.
    pub async fn cancel_and_wait(
        &mut self,
        job: &str,
        limit: Duration,
    ) -> Result<ExitCode, BoxError> {
        let asked = Instant::now();
        let status = self.cancel(job).await?;
        let outcome = |s: &JobStatus, waited: bool| -> ExitCode {
            match JobState::try_from(s.state).unwrap_or(JobState::Unspecified) {
                JobState::Cancelled => {
                    println!("job {job} cancelled ({})", s.error);
                    ExitCode::SUCCESS
                }
                JobState::Succeeded | JobState::Failed => {
                    let when = if waited {
                        "before the cancellation took effect"
                    } else {
                        "already"
                    };
                    let mut text =
                        format!("job {job} had {when} finished: {}", state_name(s.state));
                    if !s.error.is_empty() {
                        text.push_str(&format!(" ({})", s.error));
                    }
                    println!("{text}; nothing to cancel");
                    ExitCode::SUCCESS
                }
                _ => {
                    eprintln!(
                        "job {job} is still {} in {} {} after the cancellation was asked for; see `shoal status {job}`",
                        state_name(s.state),
                        s.phase,
                        watch::duration(asked.elapsed().as_millis() as i64)
                    );
                    ExitCode::FAILURE
                }
            }
        };
        if is_finished(&status) {
            return Ok(outcome(&status, false));
        }
        println!("cancelling job {job} (running, phase {})", status.phase);
        let status = self.wait_quietly(job, limit).await?;
        if status.state == JobState::Cancelled as i32 {
            println!(
                "the job stopped {} after the cancellation was asked for",
                watch::duration(asked.elapsed().as_millis() as i64)
            );
        }
        Ok(outcome(&status, true))
    }
}

/// `shoal status`: the job's state, phases with their timings, error and output.
pub fn describe(s: &JobStatus) -> String {
    let now = watch::now_ms();
    let mut text = format!(
        "{} ({}): {}{} · phase {}",
        s.job_id,
        s.name,
        state_name(s.state),
        if s.cancel_requested && !is_finished(s) {
            ", cancelling"
        } else {
            ""
        },
        s.phase
    );
    if !is_finished(s) && s.phase_progress > 0.0 {
        text.push_str(&format!(" {:.0}%", 100.0 * s.phase_progress));
    }
    text.push_str(&format!(
        "\nsubmitted {} UTC",
        watch::utc(s.submitted_unix_ms)
    ));
    if let Some(ms) = watch::job_ms(s, now) {
        text.push_str(&format!(" · ran {}", watch::duration(ms)));
    }
    for t in &s.phases {
        let (took, running) = if t.finished_unix_ms > 0 {
            (t.finished_unix_ms - t.started_unix_ms, "")
        } else {
            (now - t.started_unix_ms, " (running)")
        };
        let detail = watch::phase_detail(s, t);
        text.push_str(&format!(
            "\n  {:<9} {:>10}{running}{}",
            t.phase,
            watch::duration(took),
            if detail.is_empty() {
                String::new()
            } else {
                format!("  {detail}")
            }
        ));
    }
    if s.attempt > 1 {
        text.push_str(&format!("\nrecovered: {}", s.recovery));
    }
    if !s.error.is_empty() {
        text.push_str(&format!("\nerror: {}", s.error));
    }
    text.push_str(&format!("\noutput: {}", s.output));
    text
}

/// Prints the outcome: the segment table on success (when the report can be read
/// from here), the error otherwise. Exit code 0 only for a job that succeeded,
/// [`EXIT_CANCELLED`] for a cancelled one, 1 for a failed one.
pub async fn finish(status: &JobStatus) -> Result<ExitCode, BoxError> {
    if status.state != JobState::Succeeded as i32 {
        eprintln!(
            "job {} {}: {}",
            status.job_id,
            state_name(status.state),
            status.error
        );
        return Ok(if status.state == JobState::Cancelled as i32 {
            ExitCode::from(EXIT_CANCELLED)
        } else {
            ExitCode::FAILURE
        });
    }
    let out = store::resolve(&status.output)?;
    let report = match out.child("report.json").get().await {
        Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| format!("report.json is not valid JSON: {e}")),
        Err(e) => Err(e.to_string()),
    };
    match report {
        Ok(report) => print_segments(&report),
        Err(e) => {
            // The job succeeded; this machine may just not reach its output.
            println!(
                "job {} succeeded; its report cannot be read from here: {e}",
                status.job_id
            );
        }
    }
    println!(
        "\nthe report to read (open in a browser): {}",
        out.child("report.html").url()
    );
    println!("\noutputs in {}", out.url());
    println!(
        "  assignments.parquet/  one row per user: segment, distances, recency, frequency, monetary, R/F/M scores, RFM cell"
    );
    println!(
        "  segments.parquet      one row per segment: name, size, share, revenue, RFM mean, median and scores, centroid"
    );
    println!("  centroids.parquet     the centroids in scaled feature space");
    // what this run wrote, from its manifest (the folder may hold other files)
    let listed: Vec<String> = match out.child(MANIFEST).get().await {
        Ok(bytes) => Manifest::from_json(&String::from_utf8_lossy(&bytes))
            .map(|m| m.files.into_iter().map(|f| f.path).collect())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let has = |prefix: &str| listed.iter().any(|p| p.starts_with(prefix));
    if has("user_factors.parquet/") {
        println!("  user_factors.parquet/ one row per user: ALS factors");
    }
    if has("item_factors.parquet/") {
        println!("  item_factors.parquet/ one row per item: ALS factors");
    }
    if has("segment_items.parquet") {
        println!("  segment_items.parquet each segment's top items: users, share, lift, label");
    }
    if has("recommendations.parquet/") {
        println!("  recommendations.parquet/ per user: rank, item, score");
    }
    println!(
        "  report.html           the report for people: named segments, charts, top items, the run"
    );
    println!(
        "  report.json           rows read / kept / dropped, k-means figures, RFM cells, quality, timings"
    );
    println!("  _SUCCESS              manifest: every file with its row count");
    Ok(ExitCode::SUCCESS)
}

/// How k was chosen, when the spec gave candidates.
fn print_k_choice(choice: &serde_json::Value) {
    let Some(rows) = choice["candidates"].as_array() else {
        return;
    };
    let num = |v: &serde_json::Value, digits: usize| {
        v.as_f64()
            .map_or("n/a".to_string(), |x| format!("{x:.digits$}"))
    };
    println!(
        "{:>4} {:>12} {:>10} {:>14} {:>18} {:>9}",
        "k", "inertia", "silhouette", "Davies–Bouldin", "Calinski–Harabasz", "stability"
    );
    for r in rows {
        let chosen = r["k"] == choice["chosen"];
        println!(
            "{:>4} {:>12} {:>10} {:>14} {:>18} {:>9}{}",
            r["k"].as_u64().unwrap_or(0),
            num(&r["inertia"], 1),
            num(&r["silhouette"], 3),
            num(&r["davies_bouldin"], 3),
            num(&r["calinski_harabasz"], 1),
            num(&r["stability"], 3),
            if chosen { "  <- chosen" } else { "" }
        );
    }
    println!(
        "k = {}: {}\n",
        choice["chosen"],
        choice["rule"].as_str().unwrap_or("")
    );
}

fn print_segments(report: &serde_json::Value) {
    let f = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
    let rows = &report["rows"];
    println!(
        "{}: {} rows read, {} kept, {} users, {} workers, {} k-means iterations, {:.2} s",
        report["name"].as_str().unwrap_or("job"),
        rows["read"],
        rows["kept"],
        report["users"],
        report["workers"],
        report["kmeans"]["iterations"],
        f(&report["seconds"], "total"),
    );
    if let Some(dropped) = rows["dropped"].as_object().filter(|d| !d.is_empty()) {
        let parts: Vec<String> = dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("dropped: {}", parts.join(", "));
    }
    let q = &report["quality"];
    println!(
        "silhouette {:.3} (sample {}), Davies–Bouldin {:.3}, Calinski–Harabasz {:.1}\n",
        f(q, "silhouette"),
        q["silhouette_sample"],
        f(q, "davies_bouldin"),
        f(q, "calinski_harabasz"),
    );
    print_k_choice(&report["k_choice"]);
    println!(
        "{:>7}  {:<26} {:>7} {:>6} {:>8}  {:>14} {:>16} {:>16}",
        "segment",
        "name (share of its users)",
        "users",
        "share",
        "revenue",
        "median recency",
        "median frequency",
        "median monetary"
    );
    for s in report["segments"].as_array().into_iter().flatten() {
        let name = match s["name"].as_str() {
            Some(n) => format!("{n} ({:.0}%)", 100.0 * f(s, "name_share")),
            None => "-".into(),
        };
        println!(
            "{:>7}  {:<26} {:>7} {:>5.1}% {:>7.1}%  {:>9.0} days {:>9.0} orders {:>16.2}",
            s["segment"].as_u64().unwrap_or(0),
            name,
            s["size"].as_u64().unwrap_or(0),
            100.0 * f(s, "share"),
            100.0 * f(s, "revenue_share"),
            f(s, "recency_days_median"),
            f(s, "frequency_median"),
            f(s, "monetary_median"),
        );
    }
    let als = &report["als"];
    if als.is_object() {
        let losses = als["loss_per_iteration"].as_array();
        println!(
            "\nALS: {} users x {} items, {} pairs, {} factors, {} iterations, loss {:.5} -> {:.5}",
            als["users"],
            als["items"],
            als["pairs"],
            als["factors"],
            als["iterations"],
            losses
                .and_then(|l| l.first())
                .and_then(|v| v.as_f64())
                .unwrap_or(f64::NAN),
            losses
                .and_then(|l| l.last())
                .and_then(|v| v.as_f64())
                .unwrap_or(f64::NAN),
        );
        let e = &als["evaluation"];
        if e.is_object() {
            println!(
                "held-out evaluation at {}: precision {:.4}, MAP {:.4}, nDCG {:.4} ({} users)",
                e["k"],
                f(e, "precision_at_k"),
                f(e, "map_at_k"),
                f(e, "ndcg_at_k"),
                e["users"]
            );
        }
    }
    let segments = report["segments"].as_array().into_iter().flatten();
    if segments
        .clone()
        .any(|s| s["top_items"].as_array().is_some_and(|t| !t.is_empty()))
    {
        println!("\ntop items per segment (share of the segment's users, lift):");
    }
    for s in segments {
        let items = s["top_items"].as_array().into_iter().flatten().take(5);
        let names: Vec<String> = items
            .map(|t| {
                format!(
                    "{} ({:.0}%, lift {:.1})",
                    t["label"].as_str().or(t["item_id"].as_str()).unwrap_or("?"),
                    100.0 * f(t, "share"),
                    f(t, "lift")
                )
            })
            .collect();
        if !names.is_empty() {
            println!(
                "{:>7}  {}",
                s["segment"].as_u64().unwrap_or(0),
                names.join("; ")
            );
        }
    }
}

/// `shoal submit --output-under PREFIX`: the run's output folder below `prefix`,
/// named by the time now (UTC; names sort by time), and with `previous_latest` the
/// newest earlier folder below it with a `_SUCCESS` manifest as
/// `segments.previous`.
pub async fn dated_output(
    spec: &mut shoal_spec::JobSpec,
    prefix: &str,
    previous_latest: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let under = store::resolve(prefix)?;
    let name = chrono::Utc::now().format("%Y-%m-%dT%H%M%SZ").to_string();
    if previous_latest {
        let mut earlier = under.folders().await?;
        earlier.retain(|f| *f < name);
        for folder in earlier.iter().rev() {
            let candidate = under.child(folder);
            if candidate.child(MANIFEST).head().await?.is_some() {
                spec.segments.previous = candidate.url();
                break;
            }
        }
    }
    spec.output.path = under.child(&name).url();
    Ok(())
}
