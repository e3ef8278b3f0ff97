//! The giftcast binary: parse the command line, set up logs, bind, serve until a signal.

use clap::Parser;
use giftcast::auth::{Role, TokenKeys};
use giftcast::config::{Cli, Command};
use std::process::ExitCode;

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
        let listener = giftcast::server::bind(config.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        giftcast::server::run(config, listener, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}")),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
