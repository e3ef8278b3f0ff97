//! A small run of every load-harness scenario against the real server, with the harness's
//! money check: the bundled harness works end to end, and the server passes it.

mod common;

use common::*;

const SECRET: &str = "smoke-test-secret";

async fn server() -> TestServer {
    TestServer::start_with(|c| {
        c.token_secret = Some(SECRET.into());
        c.chat_rate_per_min = 0;
        c.gift_rate_per_min = 0;
        c.max_conns_per_ip = 0;
    })
    .await
}

fn args(server: &TestServer, scenario: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["loadtest".into()];
    v.extend(scenario.iter().map(|s| s.to_string()));
    for s in [
        "--url",
        &format!("http://{}", server.addr),
        "--token-secret",
        SECRET,
        "--admin-token",
        ADMIN,
        "--no-progress",
        "--duration-secs",
        "1",
        "--drain-secs",
        "3",
        "--sample-ms",
        "250",
    ] {
        v.push(s.to_string());
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_every_event_in_order() {
    let s = server().await;
    let r = loadtest::run_from_args(args(
        &s,
        &[
            "fanout",
            "--viewers",
            "30",
            "--senders",
            "3",
            "--rate",
            "50",
        ],
    ))
    .await
    .unwrap();
    assert!(r.counters["chats_sent"] >= 30, "{:?}", r.counters);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(!r.counters.contains_key("seq_gaps"), "{:?}", r.counters);
    assert_eq!(r.delivery_ratio, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gifts_pass_the_money_check() {
    let s = server().await;
    let r = loadtest::run_from_args(args(
        &s,
        &[
            "gifts",
            "--wallets",
            "10",
            "--rooms",
            "2",
            "--rate",
            "200",
            // The server runs in this process (so the figure includes the harness): this checks
            // the wiring of the per-gift CPU figure, not its size.
            "--server-pid",
            &std::process::id().to_string(),
        ],
    ))
    .await
    .unwrap();
    let (text, probe) = (r.to_text(), r.cpu_probe_ms);
    let m = r.money.expect("gift scenario checks money");
    assert!(m.ok, "{:#?}", m.failures);
    assert!(m.acked_coins > 0);
    assert_eq!(s.audit().await["ok"], true);
    let server = r.server.expect("--server-pid gives server figures");
    assert!(
        server.cpu_us_per_gift.is_some_and(|c| c > 0.0),
        "{:?}",
        server.cpu_us_per_gift
    );
    // The machine's speed is taken before and after the run, and printed.
    let [before, after] = probe.expect("every run carries its CPU probe");
    assert!(before > 0.0 && after > 0.0, "{before} / {after}");
    assert!(text.contains("machine: CPU probe"), "{text}");
}

/// As fast as acknowledged, a sender whose every gift in flight is refused (`rate_limited`
/// here; `unavailable` when the journal's backlog is full) sends again after
/// `REFUSED_BACKOFF_MS`. It used to wait for an answer that could not come, and sent nothing
/// for the rest of the run: this run acknowledged exactly the limiter's burst and stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_closed_loop_sender_sends_again() {
    // 600 gifts a minute: a burst of 600, then one every 100 ms.
    let s = TestServer::start_with(|c| {
        c.token_secret = Some(SECRET.into());
        c.chat_rate_per_min = 0;
        c.gift_rate_per_min = 600;
        c.max_conns_per_ip = 0;
    })
    .await;
    let url = format!("http://{}", s.addr);
    let r = loadtest::run_from_args([
        "loadtest",
        "gifts",
        "--url",
        &url,
        "--token-secret",
        SECRET,
        "--admin-token",
        ADMIN,
        "--no-progress",
        "--wallets",
        "1",
        "--rooms",
        "1",
        "--rate",
        "0",
        "--inflight",
        "8",
        "--duration-secs",
        "4",
        "--drain-secs",
        "3",
        "--sample-ms",
        "250",
    ])
    .await
    .unwrap();
    let m = r.money.expect("gift scenario checks money");
    assert!(m.ok, "{:#?}", m.failures);
    let refused = r
        .errors
        .get("gift_rejected:rate_limited")
        .copied()
        .unwrap_or(0);
    assert!(refused > 0, "the burst was not exhausted: {:?}", r.counters);
    // The burst, then ~10 a second for the rest of the run (at least 10 more in ~3.5 s).
    let acked = r.counters["gifts_ok"];
    assert!(
        acked >= 610,
        "{acked} acknowledged: the sender stopped after its refusals"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_churn_and_soak_run_clean() {
    let s = server().await;
    let r = loadtest::run_from_args(args(
        &s,
        &[
            "mixed",
            "--viewers",
            "20",
            "--chatters",
            "3",
            "--chat-rate",
            "30",
            "--gifters",
            "3",
            "--gift-rate",
            "30",
            "--thank-ratio",
            "1",
            "--server-pid",
            &std::process::id().to_string(),
        ],
    ))
    .await
    .unwrap();
    assert!(r.money.expect("money check").ok);
    // With chat in the run, the server's CPU is mostly fan-out: no per-gift figure.
    let server = r.server.expect("--server-pid gives server figures");
    assert!(server.cpu_secs_run.is_some());
    assert_eq!(server.cpu_us_per_gift, None);
    let r = loadtest::run_from_args(args(
        &s,
        &[
            "churn",
            "--clients",
            "10",
            "--hold-ms",
            "20",
            "--viewers",
            "5",
            "--senders",
            "1",
            "--rate",
            "10",
        ],
    ))
    .await
    .unwrap();
    assert!(r.counters["churn_cycles"] > 10, "{:?}", r.counters);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let r = loadtest::run_from_args(args(
        &s,
        &[
            "soak",
            "--viewers",
            "5",
            "--chatters",
            "2",
            "--gifters",
            "2",
            "--gift-rate",
            "10",
            "--window-secs",
            "0.5",
        ],
    ))
    .await
    .unwrap();
    assert!(!r.drift.is_empty());
    assert!(r.money.expect("money check").ok);
}
