//! `p2pd`: flags, logging and runtime around [`p2pd::run`].
//!
//! `main` is a plain function: it must stay free of threads until the runtime is built (so
//! that a future `--daemon` can fork safely first).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing::{error, info};

/// The p2p peer daemon: shares files, downloads them from the swarm, serves p2pctl.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// The tracker's address (host:port).
    #[arg(long, default_value = "127.0.0.1:7070", env = "P2PD_TRACKER")]
    tracker: String,

    /// TCP address other peers fetch chunks from (port 0 picks a free one; the tracker is
    /// told the real one).
    #[arg(long, default_value = "0.0.0.0:0", env = "P2PD_LISTEN")]
    listen: SocketAddr,

    /// Directory for the daemon's database [default: $XDG_DATA_HOME/p2pd or
    /// ~/.local/share/p2pd].
    #[arg(long, env = "P2PD_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Control socket for p2pctl [default: p2pd.sock in the data directory].
    #[arg(long, env = "P2PD_SOCKET")]
    socket: Option<PathBuf>,

    /// Where downloads go unless p2pctl names an output [default: downloads/ in the data
    /// directory].
    #[arg(long, env = "P2PD_DOWNLOAD_DIR")]
    download_dir: Option<PathBuf>,

    /// Address to announce to the tracker instead of the bound one.
    #[arg(long)]
    advertise: Option<SocketAddr>,

    /// Shared secret the tracker requires, if any.
    #[arg(
        long,
        env = "P2PD_SECRET",
        hide_env_values = true,
        conflicts_with = "secret_file"
    )]
    secret: Option<String>,

    /// Read the tracker's shared secret from this file (first line).
    #[arg(long)]
    secret_file: Option<PathBuf>,

    /// Give up on a peer that sends no chunk for this long.
    #[arg(long, default_value = "20s", value_parser = p2p_schema::parse_duration)]
    request_timeout: Duration,

    /// Chunk requests in flight per peer, at most.
    #[arg(long, default_value_t = 16)]
    max_in_flight: usize,

    /// Upload at most this many bytes per second (0: unlimited).
    #[arg(long, default_value_t = 0)]
    upload_rate: u64,

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
            eprintln!("p2pd: error: {e}");
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

fn config(args: Args) -> Result<(p2pd::Config, SocketAddr), String> {
    let data_dir = args.data_dir.unwrap_or_else(p2p_schema::default_data_dir);
    let data_dir = std::path::absolute(&data_dir)
        .map_err(|e| format!("data directory {}: {e}", data_dir.display()))?;
    let mut config = p2pd::Config::new(args.tracker, data_dir);
    if let Some(s) = args.socket {
        config.socket =
            std::path::absolute(&s).map_err(|e| format!("socket {}: {e}", s.display()))?;
    }
    if let Some(d) = args.download_dir {
        config.download_dir = std::path::absolute(&d)
            .map_err(|e| format!("download directory {}: {e}", d.display()))?;
    }
    config.advertise = args.advertise;
    config.secret = match (args.secret, args.secret_file) {
        (Some(s), _) => Some(s),
        (None, Some(path)) => Some(p2p_schema::read_secret(&path)?),
        (None, None) => None,
    };
    config.request_timeout = args.request_timeout;
    config.max_in_flight = args.max_in_flight.max(1);
    config.upload_rate = args.upload_rate;
    Ok((config, args.listen))
}

fn real_main(args: Args) -> Result<(), String> {
    let (config, listen) = config(args)?;
    create_private_dir(&config.data_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting runtime: {e}"))?;
    runtime.block_on(async move {
        let peers = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("binding peer address {listen}: {e}"))?;
        let control = p2pd::control::bind(&config.socket).map_err(|e| e.to_string())?;
        info!(tracker = %config.tracker, data_dir = %config.data_dir.display(), "starting");
        p2pd::run(config, peers, control, shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    })
}

fn create_private_dir(dir: &std::path::Path) -> Result<(), String> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("restricting {}: {e}", dir.display()))?;
    }
    Ok(())
}

async fn shutdown_signal() {
    p2p_schema::shutdown_signal().await;
    info!("signal received");
}
