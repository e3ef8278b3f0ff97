use clap::Parser;

/// jemalloc instead of glibc's malloc, as the server has: every gift allocates its id, its
/// frame and its pending entry, and at 100k gifts/s the harness shares the machine's cores with
/// the server it measures (glibc's malloc was ~8% of the harness's CPU in a profile).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    if let Ok(plan) = std::env::var(loadtest::CHILD_ENV) {
        // A worker process: its parent's --threads comes in TOKIO_WORKER_THREADS.
        if let Err(e) = runtime(0).block_on(loadtest::run_child(&plan)) {
            eprintln!("loadtest worker: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let cli = loadtest::Cli::parse();
    let rt = runtime(cli.common.threads);
    let print_json = cli.common.print_json;
    match rt.block_on(loadtest::run(cli)) {
        Ok(report) => {
            if print_json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report.to_text());
            }
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            if report.money.as_ref().is_some_and(|m| !m.ok) {
                eprintln!("loadtest: MONEY CHECK FAILED");
                std::process::exit(2);
            }
        }
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            std::process::exit(1);
        }
    }
}
