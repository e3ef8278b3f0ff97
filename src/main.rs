//! The giftcast binary: parse the command line, set up logs, bind, serve until a signal.

use clap::Parser;
use giftcast::auth::{Role, TokenKeys};
use giftcast::config::{Cli, Command};
use std::process::ExitCode;

/// jemalloc instead of glibc's malloc: the gift path allocates and frees many small objects with
/// mixed lifetimes and threads (frames, records, gift ids leaving memory), where glibc's bins and
/// consolidation took ~20% of the server's CPU (docs/benchmarks.md, "Allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("giftcast: {message}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Token(t)) = cli.command {
        let role: Role = match t.role.parse() {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        if !giftcast::protocol::valid_id(&t.user, giftcast::limits::ID_CHARS_MAX) {
            return fail("--user must be 1-64 of [A-Za-z0-9_-]");
        }
        let keys =
            match TokenKeys::load_or_create(cli.serve.token_secret.as_deref(), &cli.serve.data_dir)
            {
                Ok(k) => k,
                Err(e) => return fail(e),
            };
        println!("{}", keys.mint(&t.user, &t.name, role, t.ttl_secs));
        return ExitCode::SUCCESS;
    }
    let log = cli.serve.log.clone();
    let config = match cli.serve.into_config() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(async move {
        // The handlers are installed here, before anything else: a SIGTERM that arrives while
        // the server recovers or has just started is then a graceful stop, never the default
        // action (killed, nothing drained).
        let shutdown = shutdown_signal()?;
        let listener = giftcast::server::bind(config.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        giftcast::server::run(config, listener, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}")),
    }
}

/// Registers the SIGTERM and SIGINT handlers now (not at the first poll) and returns the
/// future that resolves at the first of them.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("cannot handle SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| anyhow::anyhow!("cannot handle SIGINT: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
