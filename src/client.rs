//! The operators' side of the JobService: submit, watch with progress, and the
//! segment table printed at the end.

use indicatif::{ProgressBar, ProgressStyle};
use shoal_proto::auth::{AuthChannel, WithToken};
use shoal_proto::pb::job_service_client::JobServiceClient;
use shoal_proto::pb::{GetJobRequest, JobState, JobStatus, ListWorkersRequest, SubmitJobRequest};
use shoal_proto::{JobSpec, store};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct Client {
    inner: JobServiceClient<AuthChannel>,
}

impl Client {
    /// Connects to the coordinator at `url`; every call carries `token`.
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Client, BoxError> {
        let token = WithToken::new(token).map_err(|e| format!("SHOAL_TOKEN: {e}"))?;
        let channel = Channel::from_shared(url.to_string())
            .map_err(|e| format!("the coordinator URL {url} is not valid: {e}"))?
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
    pub async fn wait_for_workers(&mut self, n: usize, limit: Duration) -> Result<(), BoxError> {
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

    /// Follows the job until it ends, with a progress line on a terminal.
    pub async fn watch(&mut self, job: &str) -> Result<JobStatus, BoxError> {
        let mut stream = self
            .inner
            .watch_job(GetJobRequest {
                job_id: job.to_string(),
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>3} {msg}").expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        let mut last = None;
        while let Some(status) = stream.message().await? {
            bar.set_message(progress_line(&status));
            last = Some(status);
        }
        bar.finish_and_clear();
        match last {
            Some(s) => Ok(s),
            None => {
                Err(format!("the coordinator ended the watch of {job} without a status").into())
            }
        }
    }
}

fn state_name(s: &JobStatus) -> &'static str {
    match JobState::try_from(s.state).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "unknown",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

fn progress_line(s: &JobStatus) -> String {
    let mut line = format!("{} · {}", state_name(s), s.phase);
    if s.rows_read > 0 {
        line.push_str(&format!(" · {} rows", s.rows_read));
    }
    if s.users > 0 {
        line.push_str(&format!(" · {} users", s.users));
    }
    if s.iteration > 0 {
        line.push_str(&format!(
            " · iteration {} · inertia {:.1}",
            s.iteration, s.inertia
        ));
    }
    line
}

pub fn describe(s: &JobStatus) -> String {
    let mut text = format!(
        "{} ({}): {} · phase {}",
        s.job_id,
        s.name,
        state_name(s),
        s.phase
    );
    if !s.error.is_empty() {
        text.push_str(&format!("\nerror: {}", s.error));
    }
    text.push_str(&format!("\noutput: {}", s.output));
    text
}

/// Prints the outcome: the segment table on success, the error otherwise.
pub async fn finish(status: &JobStatus) -> Result<ExitCode, BoxError> {
    if status.state != JobState::Succeeded as i32 {
        eprintln!(
            "job {} {}: {}",
            status.job_id,
            state_name(status),
            status.error
        );
        return Ok(ExitCode::FAILURE);
    }
    let out = store::resolve(&status.output)?;
    let report: serde_json::Value = serde_json::from_slice(&out.child("report.json").get().await?)?;
    print_segments(&report);
    println!("\noutputs in {}", out.url());
    println!(
        "  assignments.parquet/  one row per user: segment, distances, recency, frequency, monetary"
    );
    println!(
        "  segments.parquet      one row per segment: size, share, RFM mean and median, centroid"
    );
    println!("  centroids.parquet     the centroids in scaled feature space");
    println!(
        "  report.json           rows read / kept / dropped, k-means figures, quality, timings"
    );
    println!("  _SUCCESS              manifest: every file with its row count");
    Ok(ExitCode::SUCCESS)
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
    println!(
        "{:>7} {:>7} {:>6}  {:>14} {:>16} {:>16}",
        "segment", "users", "share", "median recency", "median frequency", "median monetary"
    );
    for s in report["segments"].as_array().into_iter().flatten() {
        println!(
            "{:>7} {:>7} {:>5.1}%  {:>9.0} days {:>9.0} orders {:>16.2}",
            s["segment"].as_u64().unwrap_or(0),
            s["size"].as_u64().unwrap_or(0),
            100.0 * f(s, "share"),
            f(s, "recency_days_median"),
            f(s, "frequency_median"),
            f(s, "monetary_median"),
        );
    }
}
