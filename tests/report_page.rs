//! The demo's report page as a reader sees it: `shoal demo` writes report.html, and
//! headless Chromium renders it (scripts/page-check.py drives it over the DevTools
//! protocol). Every chart must be on the rendered page, drawn (an svg of some size,
//! with marks and text), and the page must ask for nothing over the network and log
//! no error. The screenshot stays at target/report-page/demo-report.png.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The charts of report.html, by their `data-chart` names.
const CHARTS: [&str; 6] = [
    "sizes",
    "revenue",
    "profile",
    "rf-grid",
    "map",
    "convergence",
];

/// Chromium: `SHOAL_TEST_CHROMIUM`. Missing, it is an error (the page test never
/// skips).
fn chromium_path() -> PathBuf {
    let Some(p) = std::env::var_os("SHOAL_TEST_CHROMIUM").filter(|p| !p.is_empty()) else {
        panic!(
            "the report page test needs Chromium: SHOAL_TEST_CHROMIUM is unset; run scripts/test.sh (it installs Debian's chromium when none is on PATH and sets SHOAL_TEST_CHROMIUM)"
        );
    };
    let p = PathBuf::from(p);
    assert!(
        p.is_file(),
        "SHOAL_TEST_CHROMIUM={} does not exist; run scripts/test.sh, which installs chromium",
        p.display()
    );
    p
}

/// The Python of scripts/page-check.py: `SHOAL_TEST_PAGE_PYTHON`, else the venv
/// scripts/test.sh installs. Missing, it is an error.
fn page_python_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_TEST_PAGE_PYTHON").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "SHOAL_TEST_PAGE_PYTHON={} does not exist; run scripts/test.sh, which installs websocket-client into target/page-venv",
            p.display()
        );
        return p;
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/page-venv/bin/python");
    assert!(
        p.is_file(),
        "the report page test needs scripts/page-check.py's Python: SHOAL_TEST_PAGE_PYTHON is unset and {} does not exist; run scripts/test.sh (it installs websocket-client into target/page-venv and sets SHOAL_TEST_PAGE_PYTHON)",
        p.display()
    );
    p
}

/// Every file named `name` below `dir`.
fn find_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.file_name().is_some_and(|n| n == name) {
                found.push(p);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_report_page_renders_every_chart_offline_and_without_errors() {
    // the tools first: without them the test fails at once, not after the demo
    let chromium = chromium_path();
    let python = page_python_path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out_arg = out.display().to_string();
    let ran = run_shoal(
        &[
            "demo",
            "--workers",
            "1",
            "--device",
            "cpu",
            "--output",
            &out_arg,
        ],
        &[],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}", ran.text());
    let pages = find_files(&out, "report.html");
    assert_eq!(
        pages.len(),
        1,
        "one report.html in the demo's output {}: {pages:?}; the output files: {:?}\n{}",
        out.display(),
        read_manifest(&out)
            .files
            .iter()
            .map(|f| f.path.as_str())
            .collect::<Vec<_>>(),
        ran.text()
    );
    let page = pages[0].clone();

    let shot = repo.join("target/report-page/demo-report.png");
    let _ = std::fs::remove_file(&shot); // never judge an earlier run's picture
    let mut check = Command::new(&python);
    check
        .arg(repo.join("scripts/page-check.py"))
        .arg("--chromium")
        .arg(&chromium)
        .arg("--page")
        .arg(&page)
        .arg("--screenshot")
        .arg(&shot)
        .arg("--charts")
        .arg(CHARTS.join(","));
    let checked = tokio::task::spawn_blocking(move || check.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(
        checked.status.success(),
        "page-check.py on {} failed ({}):\n{stderr}",
        page.display(),
        checked.status
    );
    let seen: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap_or_else(|e| {
        panic!(
            "page-check.py printed no JSON ({e}):\n{}\n--- stderr\n{stderr}",
            String::from_utf8_lossy(&checked.stdout)
        )
    });
    let all = serde_json::to_string_pretty(&seen).unwrap();
    eprintln!(
        "report page {} as Chromium rendered it (screenshot {}):\n{all}",
        page.display(),
        shot.display()
    );

    assert_eq!(
        seen["requests"],
        serde_json::json!([]),
        "the page asks for nothing beyond itself:\n{all}"
    );
    assert_eq!(
        seen["errors"],
        serde_json::json!([]),
        "the page logs no error or warning:\n{all}"
    );
    for name in CHARTS {
        let c = &seen["charts"][name];
        assert_eq!(c["present"], true, "chart {name} is on the page:\n{all}");
        assert_eq!(c["svg"], true, "chart {name} has an svg:\n{all}");
        let num = |key: &str| {
            c[key]
                .as_f64()
                .unwrap_or_else(|| panic!("chart {name}: no number {key}:\n{all}"))
        };
        assert!(
            num("width") > 50.0,
            "chart {name} is wider than 50 px:\n{all}"
        );
        assert!(
            num("height") > 50.0,
            "chart {name} is taller than 50 px:\n{all}"
        );
        assert!(
            num("marks") > 3.0,
            "chart {name} draws more than 3 marks:\n{all}"
        );
        assert!(num("texts") > 0.0, "chart {name} has text:\n{all}");
    }
    let bytes = std::fs::metadata(&shot)
        .unwrap_or_else(|e| panic!("screenshot {}: {e}", shot.display()))
        .len();
    assert!(
        bytes > 10 * 1024,
        "the screenshot {} has {bytes} bytes, not a rendered page",
        shot.display()
    );
}
