//! How the CLI shows jobs: the live progress of one job (on a terminal, a bar per
//! phase as the phases come; otherwise one plain line per change) and the table of
//! jobs. Everything shown comes from the coordinator's `JobStatus`.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use shoal_proto::pb::{JobState, JobStatus, PhaseTiming};
use shoal_report::int;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Exit code of `watch` / `submit --wait` / `run` for a cancelled job (a failed
/// job exits 1, clap's usage errors 2).
pub const EXIT_CANCELLED: u8 = 3;

/// Bars measure a phase in thousandths.
const BAR_STEPS: u64 = 1000;

pub fn state_name(state: i32) -> &'static str {
    match JobState::try_from(state).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "unknown",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

pub fn is_finished(s: &JobStatus) -> bool {
    matches!(
        JobState::try_from(s.state),
        Ok(JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    )
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A duration for people: `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 07 min`.
pub fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {:02} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {:02} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of milliseconds since the Unix epoch.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (day, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil_from_days (H. Hinnant)
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1_048_576.0)
}

/// How long the job has run (queued time not counted): to its end, or to now.
pub fn job_ms(s: &JobStatus, now: i64) -> Option<i64> {
    if s.started_unix_ms == 0 {
        return None;
    }
    let end = if s.finished_unix_ms > 0 {
        s.finished_unix_ms
    } else {
        now
    };
    Some(end - s.started_unix_ms)
}

fn phase_ms(t: &PhaseTiming, now: i64) -> i64 {
    let end = if t.finished_unix_ms > 0 {
        t.finished_unix_ms
    } else {
        now
    };
    end - t.started_unix_ms
}

/// What phase `t` of the job has processed: rows read in ingest, users after,
/// iterations and inertia in lloyd.
pub fn phase_detail(s: &JobStatus, t: &PhaseTiming) -> String {
    let running = t.finished_unix_ms == 0;
    match t.phase.as_str() {
        "ingest" => {
            let mut text = format!("{} rows", int(t.rows));
            if running && s.bytes_total > 0 {
                text.push_str(&format!(
                    " · {} / {} MB",
                    mb(s.bytes_read),
                    mb(s.bytes_total)
                ));
            }
            text
        }
        "lloyd" => {
            let mut text = if running {
                format!("iteration {}/{}", s.iteration, s.max_iter)
            } else {
                format!("{} iterations", s.iteration)
            };
            if s.iteration > 0 {
                text.push_str(&format!(" · inertia {:.6e}", s.inertia));
            }
            text
        }
        "als" if running && s.iteration > 0 => {
            format!("iteration {} · {} users", s.iteration, int(t.rows))
        }
        _ if t.rows > 0 => format!("{} users", int(t.rows)),
        _ => String::new(),
    }
}

/// `eta 3.2 s` for the running phase: the coordinator's estimate, counted down
/// since the status arrived. In lloyd it is an upper bound (k-means usually
/// converges before max_iter).
fn eta(s: &JobStatus, received: Instant) -> Option<String> {
    if s.phase_eta_ms <= 0 || is_finished(s) {
        return None;
    }
    let left = s.phase_eta_ms - received.elapsed().as_millis() as i64;
    let bound = if s.phase == "lloyd" { "≤ " } else { "" };
    Some(format!("eta {bound}{}", duration(left)))
}

fn join(parts: impl IntoIterator<Item = String>) -> String {
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" · ")
}

/// The job in one line: id, name, state (and a pending cancellation), time run.
fn job_line(s: &JobStatus, now: i64) -> String {
    let mut state = state_name(s.state).to_string();
    if s.cancel_requested && !is_finished(s) {
        state.push_str(", cancelling");
    }
    join([
        format!("job {} ({}): {state}", s.job_id, s.name),
        job_ms(s, now).map(duration).unwrap_or_default(),
    ])
}

/// The running phase in one line, without its name.
fn running_detail(s: &JobStatus, t: &PhaseTiming, received: Instant, now: i64) -> String {
    join([
        phase_detail(s, t),
        duration(phase_ms(t, now)),
        eta(s, received).unwrap_or_default(),
    ])
}

/// A phase that has ended in one line, without its name.
fn done_detail(s: &JobStatus, t: &PhaseTiming) -> String {
    join([
        duration(t.finished_unix_ms - t.started_unix_ms),
        phase_detail(s, t),
    ])
}

/// Whether `t`, the last phase of a job that ended without success, is where it
/// stopped.
fn stopped_in(s: &JobStatus, i: usize) -> bool {
    is_finished(s) && s.state != JobState::Succeeded as i32 && i + 1 == s.phases.len()
}

/// The live view of one job.
pub enum View {
    Bars(Box<Bars>),
    Plain(Plain),
}

impl View {
    /// Bars when standard output is a terminal, plain lines otherwise.
    pub fn new() -> View {
        if std::io::stdout().is_terminal() {
            View::Bars(Box::new(Bars::new()))
        } else {
            View::Plain(Plain::default())
        }
    }

    /// A new status arrived.
    pub fn show(&mut self, s: &JobStatus) {
        match self {
            View::Bars(b) => b.show(s, Instant::now()),
            View::Plain(p) => {
                for line in p.lines(s, Instant::now(), now_ms()) {
                    println!("{line}");
                }
            }
        }
    }

    /// Time passed: refresh elapsed times and ETAs (bars only).
    pub fn tick(&mut self) {
        if let View::Bars(b) = self {
            b.tick();
        }
    }

    /// The watch ended; `last` is the final status.
    pub fn end(&mut self, last: Option<&JobStatus>) {
        match self {
            View::Bars(b) => b.end(last),
            View::Plain(p) => {
                if let Some(s) = last {
                    for line in p.lines(s, Instant::now(), now_ms()) {
                        println!("{line}");
                    }
                }
            }
        }
    }
}

/// One line per change: a line when the job's state changes, one when a phase
/// ends (with its duration and what it processed), and one whenever what the
/// running phase shows changes.
#[derive(Default)]
pub struct Plain {
    state: Option<(i32, bool)>,
    phases_done: usize,
    current: String,
}

impl Plain {
    /// The lines that status `s` adds.
    pub fn lines(&mut self, s: &JobStatus, received: Instant, now: i64) -> Vec<String> {
        let mut out = Vec::new();
        let finished = is_finished(s);
        if !finished && self.state != Some((s.state, s.cancel_requested)) {
            self.state = Some((s.state, s.cancel_requested));
            out.push(job_line(s, now));
        }
        for (i, t) in s.phases.iter().enumerate().skip(self.phases_done) {
            if t.finished_unix_ms == 0 {
                break;
            }
            self.phases_done = i + 1;
            let verb = if stopped_in(s, i) { "stopped" } else { "done" };
            out.push(format!("{:<9} {verb} · {}", t.phase, done_detail(s, t)));
        }
        if let Some(t) = s.phases.last().filter(|t| t.finished_unix_ms == 0) {
            let percent = if s.phase_progress > 0.0 {
                format!("{:>3.0}% ", 100.0 * s.phase_progress)
            } else {
                String::new()
            };
            // the phase's own elapsed time changes every time: not a change
            let mut detail = join([phase_detail(s, t), eta(s, received).unwrap_or_default()]);
            if detail.is_empty() && percent.is_empty() {
                detail = "started".into();
            }
            let line = format!("{:<9} {percent}{detail}", t.phase);
            if line != self.current {
                out.push(line.clone());
                self.current = line;
            }
        }
        if finished && self.state != Some((s.state, s.cancel_requested)) {
            self.state = Some((s.state, s.cancel_requested));
            out.push(job_line(s, now));
        }
        out
    }
}

struct PhaseBar {
    bar: ProgressBar,
    /// the style with a bar (progress known) is set
    measured: bool,
    done: bool,
}

/// A bar per phase under a line for the job, drawn on standard output.
pub struct Bars {
    multi: MultiProgress,
    job: ProgressBar,
    phases: Vec<PhaseBar>,
    last: Option<(JobStatus, Instant)>,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid progress template")
        .progress_chars("=> ")
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ")
}

fn spinner_style() -> ProgressStyle {
    style("{prefix:>9.bold} {spinner:.cyan} {wide_msg}")
}

fn bar_style() -> ProgressStyle {
    style("{prefix:>9.bold} [{bar:32.cyan/blue}] {percent:>3}% {wide_msg}")
}

fn done_style(ok: bool) -> ProgressStyle {
    if ok {
        style("{prefix:>9.bold} {msg:.green}")
    } else {
        style("{prefix:>9.bold} {msg:.red}")
    }
}

impl Bars {
    fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let job = multi.add(ProgressBar::new_spinner());
        job.set_style(style("{msg}"));
        Bars {
            multi,
            job,
            phases: Vec::new(),
            last: None,
        }
    }

    fn show(&mut self, s: &JobStatus, received: Instant) {
        let now = now_ms();
        self.job.set_message(job_line(s, now));
        for (i, t) in s.phases.iter().enumerate() {
            if i == self.phases.len() {
                let bar = self.multi.add(ProgressBar::new(BAR_STEPS));
                bar.set_style(spinner_style());
                bar.set_prefix(t.phase.clone());
                bar.enable_steady_tick(Duration::from_millis(120));
                self.phases.push(PhaseBar {
                    bar,
                    measured: false,
                    done: false,
                });
            }
            let p = &mut self.phases[i];
            if p.done {
                continue;
            }
            if t.finished_unix_ms > 0 {
                let ok = !stopped_in(s, i);
                p.bar.disable_steady_tick();
                p.bar.set_style(done_style(ok));
                let mark = if ok { "✓" } else { "✗" };
                p.bar
                    .finish_with_message(format!("{mark} {}", done_detail(s, t)));
                p.done = true;
                continue;
            }
            if s.phase_progress > 0.0 {
                if !p.measured {
                    p.bar.set_style(bar_style());
                    p.measured = true;
                }
                p.bar
                    .set_position((s.phase_progress.clamp(0.0, 1.0) * BAR_STEPS as f64) as u64);
            }
            p.bar.set_message(running_detail(s, t, received, now));
        }
        self.last = Some((s.clone(), received));
    }

    fn tick(&mut self) {
        if let Some((s, received)) = self.last.take() {
            self.show(&s, received);
        }
    }

    fn end(&mut self, last: Option<&JobStatus>) {
        if let Some(s) = last {
            self.show(s, Instant::now());
        }
        for p in self.phases.iter().filter(|p| !p.done) {
            p.bar.abandon();
        }
        self.job.finish();
    }
}

/// The jobs as a table: id, name, state, phase, when submitted, how long it ran,
/// and the error (first line, shortened) of a job that did not succeed.
pub fn jobs_table(jobs: &[JobStatus], now: i64) -> String {
    const MAX_ERROR: usize = 100;
    let header = [
        "JOB",
        "NAME",
        "STATE",
        "PHASE",
        "SUBMITTED (UTC)",
        "DURATION",
        "ERROR",
    ];
    let rows: Vec<[String; 7]> = jobs
        .iter()
        .map(|s| {
            let mut state = state_name(s.state).to_string();
            if s.cancel_requested && !is_finished(s) {
                state.push_str(" (cancelling)");
            }
            let phase = if !is_finished(s) && s.phase_progress > 0.0 {
                format!("{} {:.0}%", s.phase, 100.0 * s.phase_progress)
            } else {
                s.phase.clone()
            };
            let mut error = s.error.lines().next().unwrap_or("").to_string();
            if error.chars().count() > MAX_ERROR {
                error = error.chars().take(MAX_ERROR - 1).collect::<String>() + "…";
            }
            [
                s.job_id.clone(),
                s.name.clone(),
                state,
                phase,
                utc(s.submitted_unix_ms),
                job_ms(s, now).map(duration).unwrap_or_else(|| "-".into()),
                error,
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        text.trim_end().to_string()
    };
    let mut out = vec![line(header.to_vec())];
    for row in &rows {
        out.push(line(row.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(phase: &str, started: i64, finished: i64, rows: u64) -> PhaseTiming {
        PhaseTiming {
            phase: phase.into(),
            started_unix_ms: started,
            finished_unix_ms: finished,
            rows,
        }
    }

    #[test]
    fn numbers_durations_and_dates_for_people() {
        assert_eq!(int(0), "0");
        assert_eq!(int(999), "999");
        assert_eq!(int(1000), "1,000");
        assert_eq!(int(541_909), "541,909");
        assert_eq!(int(1_234_567), "1,234,567");
        assert_eq!(duration(-5), "0 ms");
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_345), "12.3 s");
        assert_eq!(duration(245_000), "4 min 05 s");
        assert_eq!(duration(7_620_000), "2 h 07 min");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        // 2011-12-09 12:50:00 UTC, the last event of the Online Retail log
        assert_eq!(utc(1_323_435_000_000), "2011-12-09 12:50:00");
        assert_eq!(utc(951_782_400_123), "2000-02-29 00:00:00");
    }

    #[test]
    fn plain_view_prints_a_line_per_change() {
        let mut p = Plain::default();
        let t0 = Instant::now();
        let mut s = JobStatus {
            job_id: "job-1".into(),
            name: "demo".into(),
            state: JobState::Running as i32,
            phase: "ingest".into(),
            started_unix_ms: 1_000,
            bytes_total: 10 * 1_048_576,
            max_iter: 300,
            phases: vec![
                timing("plan", 1_000, 1_200, 0),
                timing("ingest", 1_200, 0, 0),
            ],
            ..Default::default()
        };
        let lines = p.lines(&s, t0, 2_000);
        assert_eq!(
            lines,
            vec![
                "job job-1 (demo): running · 1.0 s",
                "plan      done · 200 ms",
                "ingest    0 rows · 0.0 / 10.0 MB",
            ]
        );
        // the same status again: nothing new
        assert!(p.lines(&s, t0, 2_500).is_empty());
        s.rows_read = 120_000;
        s.phases[1].rows = 120_000;
        s.bytes_read = 5 * 1_048_576;
        s.phase_progress = 0.5;
        s.phase_eta_ms = 4_000;
        let lines = p.lines(&s, t0, 3_000);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("ingest     50% 120,000 rows · 5.0 / 10.0 MB · eta "),
            "{lines:?}"
        );
        // the phase ends, lloyd runs, the job fails there
        s.phases[1].finished_unix_ms = 4_200;
        s.phases.push(timing("lloyd", 4_200, 0, 400));
        s.phase = "lloyd".into();
        s.phase_progress = 0.01;
        s.phase_eta_ms = 0;
        s.iteration = 3;
        s.inertia = 1234.5;
        let lines = p.lines(&s, t0, 4_500);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0], "ingest    done · 3.0 s · 120,000 rows");
        assert_eq!(
            lines[1],
            "lloyd       1% iteration 3/300 · inertia 1.234500e3"
        );
        s.state = JobState::Failed as i32;
        s.error = "worker worker-1 failed in lloyd: boom".into();
        s.phases[2].finished_unix_ms = 5_000;
        s.finished_unix_ms = 5_000;
        let lines = p.lines(&s, t0, 6_000);
        assert_eq!(
            lines,
            vec![
                "lloyd     stopped · 800 ms · 3 iterations · inertia 1.234500e3",
                "job job-1 (demo): failed · 4.0 s",
            ]
        );
    }

    #[test]
    fn jobs_table_lines_up_and_shortens_errors() {
        let ok = JobStatus {
            job_id: "job-a".into(),
            name: "nightly".into(),
            state: JobState::Succeeded as i32,
            phase: "done".into(),
            submitted_unix_ms: 1_323_435_000_000,
            started_unix_ms: 1_323_435_000_000,
            finished_unix_ms: 1_323_435_012_300,
            ..Default::default()
        };
        let failed = JobStatus {
            job_id: "job-b".into(),
            name: "x".into(),
            state: JobState::Failed as i32,
            phase: "ingest".into(),
            submitted_unix_ms: 1_323_435_060_000,
            started_unix_ms: 1_323_435_060_000,
            finished_unix_ms: 1_323_435_060_500,
            error: format!("{}\nsecond line", "e".repeat(150)),
            ..Default::default()
        };
        let queued = JobStatus {
            job_id: "job-c".into(),
            name: "later".into(),
            state: JobState::Queued as i32,
            phase: "queued".into(),
            submitted_unix_ms: 1_323_435_070_000,
            ..Default::default()
        };
        let table = jobs_table(&[ok, failed, queued], 1_323_435_080_000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("JOB    NAME     STATE      PHASE   SUBMITTED (UTC)"));
        assert_eq!(
            lines[1],
            "job-a  nightly  succeeded  done    2011-12-09 12:50:00  12.3 s"
        );
        assert!(
            lines[2].ends_with(&format!("500 ms    {}…", "e".repeat(99))),
            "{table}"
        );
        assert!(
            lines[3].contains("queued") && lines[3].contains("  -"),
            "{table}"
        );
    }
}
