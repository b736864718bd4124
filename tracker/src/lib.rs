//! `p2p-tracker`: the registry of files and of which peers hold which chunks.
//!
//! # Layout
//! - [`registry`]: the state (in memory, written through to sled) and every operation on it.
//! - [`session`]: one task per daemon connection: handshake, requests, liveness.
//! - [`run`]: accepts connections and expires silent peers until told to shut down.
//! - [`settings`]: flags, environment, configuration file and defaults, merged.
//! - `main.rs`: `--daemon`, logging, runtime, and the `stats` subcommand.
//!
//! Peers are daemons (`p2pd`). Each keeps one session open, sends a heartbeat every
//! `heartbeat_ms`, and is dropped (with its holdings) when it says `Bye` or after the TTL of
//! silence.

pub mod metrics;
pub mod registry;
pub mod session;
pub mod settings;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use p2p_schema::secure::{Keypair, SwarmKey};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};

pub use registry::Registry;

/// Errors of the tracker process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Db(String, #[source] sled::Error),
    #[error(transparent)]
    Open(#[from] p2p_service::store::OpenError),
}

/// A peer not heard from for this long is dropped, unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// Settings of a running tracker.
#[derive(Debug, Clone)]
pub struct Config {
    /// A peer not heard from for this long is dropped.
    pub ttl: Duration,
    /// The key of a closed swarm (from its secret): sessions must prove it. `None`: open.
    pub swarm: Option<SwarmKey>,
    /// Record the IP a peer announces instead of the one its session comes from (always so
    /// in a closed swarm, whose members are trusted).
    pub trust_advertised: bool,
    /// Most files one peer may hold at once.
    pub max_files_per_peer: usize,
    /// Most holders returned for one `Locate`.
    pub max_holders: u32,
    /// Most connections held at once, in all and from one IP address; more are refused.
    pub max_connections: usize,
    pub max_per_address: usize,
    /// Where metrics are served (`http://ADDR/metrics`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ttl: DEFAULT_TTL,
            swarm: None,
            trust_advertised: false,
            max_files_per_peer: registry::DEFAULT_MAX_FILES_PER_PEER,
            max_holders: 200,
            max_connections: 4096,
            max_per_address: 256,
            metrics: None,
        }
    }
}

/// Serves peers on `listener` until `shutdown` resolves, then flushes the registry.
pub async fn run(
    listener: TcpListener,
    registry: Arc<Registry>,
    config: Config,
    key: Keypair,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    registry.set_max_files_per_peer(config.max_files_per_peer);
    let config = Arc::new(config);
    let key = Arc::new(key);
    let refusals = Arc::new(p2p_service::accept::Throttle::new(Duration::from_secs(1)));
    let caps =
        p2p_service::caps::ConnectionCaps::new(config.max_connections, config.max_per_address);
    let stop = CancellationToken::new();
    let metrics = Arc::new(metrics::Metrics::new());
    if let Some(addr) = config.metrics {
        let listener = p2p_service::metrics::bind(addr)
            .await
            .map_err(|e| Error::Io("binding the metrics address".into(), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::Io("reading the bound metrics address".into(), e))?;
        info!("serving metrics on http://{bound}/metrics");
        let (registry, metrics) = (registry.clone(), metrics.clone());
        let render: p2p_service::metrics::Render =
            Arc::new(move || metrics.render(&registry.stats()));
        tokio::spawn(p2p_service::metrics::serve(listener, render, stop.clone()));
    }
    let reaper = tokio::spawn(reap(registry.clone(), config.ttl, stop.clone()));
    let accepting = async {
        while let Some((stream, addr, slot)) =
            p2p_service::accept::next_admitted("peer", &listener, &caps, &stop).await
        {
            let span = tracing::info_span!("session", remote = %addr);
            let session = session::serve(
                stream,
                addr,
                session::Shared {
                    registry: registry.clone(),
                    config: config.clone(),
                    key: key.clone(),
                    refusals: refusals.clone(),
                    metrics: metrics.clone(),
                },
                stop.clone(),
            );
            tokio::spawn(
                async move {
                    session.await;
                    drop(slot);
                }
                .instrument(span),
            );
        }
    };
    tokio::select! {
        () = shutdown => {}
        () = accepting => {}
    }
    info!("shutting down");
    p2p_service::lifecycle::notify_stopping();
    stop.cancel();
    let _ = reaper.await;
    registry.flush().await
}

/// Drops peers silent for longer than the TTL, checking a few times per TTL (at least once a
/// second).
async fn reap(registry: Arc<Registry>, ttl: Duration, stop: CancellationToken) {
    let period = (ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        for (addr, left) in registry.expire() {
            info!(
                reason = "timed out",
                "{addr} has disconnected. {left} peers on network."
            );
        }
    }
}
