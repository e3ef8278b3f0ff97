//! Browser end to end: Debian's chromium driven by playwright-core (tests/browser/e2e.mjs)
//! against a real server. Needs `chromium` and `tests/browser/node_modules` (installed by
//! .ci/run); fails, never skips, without them.

mod common;

use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_dashboard_and_overlay_in_a_real_browser() {
    let server = TestServer::start().await;
    let root = env!("CARGO_MANIFEST_DIR");
    let artifacts = std::path::Path::new(root).join("target/browser-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    assert!(
        std::path::Path::new(root)
            .join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run `bash .ci/run` (or `cd tests/browser && npm ci`)"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Debian's chromium is not installed: run `bash .ci/run`"
    );
    let base = format!("http://{}", server.addr);
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("tests/browser/e2e.mjs")
        .current_dir(root)
        .env("BASE_URL", &base)
        .env("ADMIN_TOKEN", ADMIN)
        .env("ARTIFACTS", &artifacts)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("browser tests took over 300 s")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(out.status.success(), "browser tests failed");
    assert!(
        stdout.lines().any(|l| l.trim().ends_with(" 0 failed")),
        "no summary line"
    );
    assert_eq!(server.audit().await["ok"], true);
}
