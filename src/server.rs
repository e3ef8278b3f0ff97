//! Start and stop: bind, wire the parts, serve, drain on shutdown.

use crate::app::App;
use crate::auth::TokenKeys;
use crate::config::Config;
use crate::durable::Durable;
use crate::hub::Hub;
use crate::limits::{LISTEN_BACKLOG, SHUTDOWN_DRAIN_MS};
use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};

/// Binds with a listen backlog of `LISTEN_BACKLOG` (std's 128 drops SYNs in connection storms).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The process-wide metrics recorder (several servers in one test process share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Builds the application: identity, recovery of money, hub.
pub async fn build(config: Config) -> anyhow::Result<Arc<App>> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let keys = TokenKeys::load_or_create(config.token_secret.as_deref(), &config.data_dir)?;
    // Before anything registers a metric handle (the ledger does, at recovery).
    let metrics = metrics_handle();
    if config.unsafe_ack_before_durable {
        tracing::warn!("--unsafe-ack-before-durable: acknowledging money before it is durable (test negative control)");
    }
    let (durable, ledger) = Durable::open(
        &config.data_dir,
        config.database_url.as_deref(),
        config.split,
        config.unsafe_ack_before_durable,
        config
            .cluster
            .as_ref()
            .map(|c| c.node_id.as_str())
            .unwrap_or("local"),
        config.journal.clone(),
        config.idempotency.clone(),
    )
    .await?;
    let hub = Hub::new(std::time::Duration::from_millis(config.fanout_tick_ms));
    let app = Arc::new(App::new(
        config,
        hub.clone(),
        Arc::new(ledger),
        keys,
        metrics,
        Some(Arc::new(durable)),
    ));
    if let Some(c) = &app.config.cluster {
        let cluster =
            crate::cluster::Cluster::connect(&c.nats_url, &c.cluster_id, &c.node_id, &c.nodes)
                .await?;
        cluster.start(app.clone()).await?;
        let _ = app.cluster.set(cluster);
    }
    tokio::spawn(hub.run_viewer_counts(app.shutdown.subscribe()));
    tokio::spawn(app.clone().run_packet_expiry());
    tokio::spawn(app.clone().run_idempotency_sweep());
    Ok(app)
}

/// Serves until `shutdown` resolves, then stops taking connections and money, closes every
/// socket with 1001, waits for in-flight gifts to settle, and returns.
///
/// A `shutdown` that resolves while the server is still starting (recovery, a database that
/// does not answer) ends the start at once: nothing has been accepted yet, and what recovery
/// left half done is exactly what a kill at that moment would leave, which the next start
/// handles (tests/crash.rs).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use futures_util::FutureExt;
    let shutdown = shutdown.boxed().shared();
    let app = tokio::select! {
        app = build(config) => app?,
        () = shutdown.clone() => {
            tracing::info!("stopped while starting: nothing was served");
            return Ok(());
        }
    };
    serve(app, listener, shutdown).await
}

pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %app.config.data_dir.display(), guest_signup = app.config.guest_signup, "giftcast listening");
    let router = crate::http::router(app.clone());
    let app2 = app.clone();
    crate::http::serve(
        listener,
        router,
        Duration::from_millis(app.config.http_header_read_timeout_ms),
        async move {
            shutdown.await;
            tracing::info!("shutting down: closing connections, settling money");
            app2.begin_shutdown();
        },
    )
    .await
    .context("serving")?;
    // Every gift that was debited gets settled (durable and announced, or undone).
    let deadline = tokio::time::Instant::now() + Duration::from_millis(SHUTDOWN_DRAIN_MS);
    while app.gifts_in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(durable) = &app.durability {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        durable.close(left.max(Duration::from_secs(1))).await;
    }
    tracing::info!("stopped");
    Ok(())
}
