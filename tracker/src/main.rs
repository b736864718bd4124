//! `p2p-tracker`: flags, logging and runtime around [`p2p_tracker::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use p2p_tracker::{Config, Registry};
use tracing::{error, info};

/// The tracker of a p2p swarm: records which peers hold which chunks of which files.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// TCP address peers connect to.
    #[arg(long, default_value = "127.0.0.1:7070", env = "P2P_TRACKER_LISTEN")]
    listen: SocketAddr,

    /// Directory for the registry database.
    #[arg(long, env = "P2P_TRACKER_DATA_DIR")]
    data_dir: PathBuf,

    /// Drop a peer not heard from for this long (e.g. 30s, 500ms).
    #[arg(long, default_value = "30s", value_parser = p2p_schema::parse_duration)]
    ttl: Duration,

    /// Shared secret peers must present (default: an open tracker).
    #[arg(
        long,
        env = "P2P_TRACKER_SECRET",
        hide_env_values = true,
        conflicts_with = "secret_file"
    )]
    secret: Option<String>,

    /// Read the shared secret from this file (first line).
    #[arg(long)]
    secret_file: Option<PathBuf>,

    /// Log level or filter (overridden by RUST_LOG).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args.log_level);
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("p2p-tracker: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn real_main(args: Args) -> Result<(), String> {
    let secret = match (&args.secret, &args.secret_file) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(path)) => Some(p2p_schema::read_secret(path)?),
        (None, None) => None,
    };
    let config = Config {
        ttl: args.ttl,
        secret,
        ..Config::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting runtime: {e}"))?;
    runtime.block_on(async move {
        let registry = Registry::open(&args.data_dir, config.ttl).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("binding {}: {e}", args.listen))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("reading bound address: {e}"))?;
        info!(
            ttl = ?config.ttl,
            secret = config.secret.is_some(),
            "Waiting for peers... listening on {addr}"
        );
        p2p_tracker::run(listener, Arc::new(registry), config, shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    })
}

async fn shutdown_signal() {
    p2p_schema::shutdown_signal().await;
    info!("signal received");
}
