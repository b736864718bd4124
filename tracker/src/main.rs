//! `p2p-tracker`: settings, logging, `--daemon`, runtime, then [`p2p_tracker::run`]; and the
//! `stats` subcommand.
//!
//! `main` stays free of threads until the runtime is built, so `--daemon` can fork first.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use p2p_schema::secure::{self, Keypair, SwarmKey};
use p2p_schema::{FrameReader, FrameWriter, TrackerRequest, TrackerResponse, MAX_FRAME};
use p2p_service::lifecycle::{self as service, Readiness};
use p2p_tracker::settings::Settings;
use p2p_tracker::Registry;
use tracing::info;

/// The tracker of a p2p swarm: records which peers hold which chunks of which files.
///
/// Settings come from flags, then P2P_TRACKER_* environment variables, then the configuration
/// file, then defaults. Runs in the foreground (as systemd expects), or detaches with --daemon.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    #[command(flatten)]
    settings: Settings,

    /// Configuration file (TOML, keys as the flags) [default: $CONFIGURATION_DIRECTORY/
    /// config.toml under systemd, else ~/.config/p2p-tracker/config.toml, if it exists].
    #[arg(long, env = "P2P_TRACKER_CONFIG")]
    config: Option<PathBuf>,

    /// Print the effective settings (as a configuration file) and exit.
    #[arg(long)]
    print_config: bool,

    /// Detach into the background; returns once the tracker is listening (or says why not).
    #[arg(long)]
    daemon: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a running tracker's counters: files, peers, holdings, requests served.
    ///
    /// Example: p2p-tracker stats --tracker 127.0.0.1:7070
    Stats {
        /// The tracker to ask.
        #[arg(long, default_value = "127.0.0.1:7070")]
        tracker: String,
        /// The swarm secret of a closed swarm (prefer --secret-file).
        #[arg(long, env = "P2P_TRACKER_SECRET", hide_env_values = true)]
        secret: Option<p2p_service::Secret>,
        /// Read the swarm secret from this file (first line).
        #[arg(long, env = "P2P_TRACKER_SECRET_FILE")]
        secret_file: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let fail = |e: String| {
        eprintln!("p2p-tracker: error: {e}");
        ExitCode::FAILURE
    };
    if let Some(Command::Stats {
        tracker,
        secret,
        secret_file,
        json,
    }) = &args.command
    {
        let swarm = p2p_service::identity::swarm_key(secret.as_ref(), secret_file.as_deref());
        return match swarm.and_then(|swarm| stats(tracker, swarm.as_ref(), *json)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    let (settings, mut readiness) = match service::start(
        args.settings,
        args.config.as_deref(),
        args.print_config,
        args.daemon,
    ) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let listen = settings.listen();
    let data_dir = settings.data_dir.clone().unwrap_or_default();
    let result = settings
        .to_config()
        .and_then(|config| serve(config, listen, data_dir, &mut readiness));
    service::finish("p2p-tracker", result, &mut readiness)
}

fn serve(
    config: p2p_tracker::Config,
    listen: SocketAddr,
    data_dir: PathBuf,
    readiness: &mut Readiness,
) -> Result<(), String> {
    service::runtime()?.block_on(async move {
        // Handlers first: a signal right after readiness must still stop us cleanly.
        let shutdown = service::shutdown_signal();
        // Opening may wait for the database's lock: off the executor.
        let ttl = config.ttl;
        let dir = data_dir.clone();
        let registry = tokio::task::spawn_blocking(move || Registry::open(&dir, ttl))
            .await
            .map_err(|e| format!("opening the registry: {e}"))?
            .map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("binding {listen}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("reading bound address: {e}"))?;
        // After the registry: only the tracker that holds the data directory writes there.
        let dir = data_dir.clone();
        let key = tokio::task::spawn_blocking(move || load_key(&dir))
            .await
            .map_err(|e| format!("reading the tracker key: {e}"))??;
        info!(
            ttl = ?config.ttl,
            closed = config.swarm.is_some(),
            key = %hex::encode(key.public()),
            "Waiting for peers... listening on {addr}"
        );
        readiness.ready(&format!("listening on {addr}"));
        p2p_tracker::run(listener, Arc::new(registry), config, key, shutdown)
            .await
            .map_err(|e| e.to_string())
    })
}

/// The tracker's key pair, `tracker.key` in the data directory (made on first start), and
/// its public half in `tracker.pub`, for daemons to pin with `--tracker-key`.
fn load_key(data_dir: &std::path::Path) -> Result<Keypair, String> {
    let (key, made) = p2p_service::identity::load_or_create(&data_dir.join("tracker.key"))
        .map_err(|e| e.to_string())?;
    if made {
        info!("made a new tracker key");
    }
    let public = data_dir.join("tracker.pub");
    std::fs::write(&public, format!("{}\n", hex::encode(key.public())))
        .map_err(|e| format!("writing {}: {e}", public.display()))?;
    Ok(key)
}

/// `p2p-tracker stats`: asks a running tracker for its counters.
fn stats(tracker: &str, swarm: Option<&SwarmKey>, json: bool) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting runtime: {e}"))?;
    let stats = runtime.block_on(async {
        let mut stream = tokio::net::TcpStream::connect(tracker)
            .await
            .map_err(|e| format!("no tracker at {tracker}: {e}"))?;
        // A throw-away identity: asking for counters joins nothing.
        let key = Keypair::generate().map_err(|e| e.to_string())?;
        let session = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            secure::connect(&mut stream, &key, swarm, None),
        )
        .await
        .map_err(|_| format!("{tracker}: no answer to the handshake in 10 s"))?
        .map_err(|e| format!("tracker refused us: {e}"))?;
        let (r, w) = stream.into_split();
        let (r, w) = session.into_stream(r, w);
        let (mut reader, mut writer) = (FrameReader::new(r, MAX_FRAME), FrameWriter::new(w));
        writer
            .send(&TrackerRequest::Stats)
            .await
            .map_err(|e| format!("asking {tracker}: {e}"))?;
        match reader.expect::<TrackerResponse>().await {
            Ok(TrackerResponse::Stats(s)) => Ok(s),
            Ok(TrackerResponse::Error(e)) => Err(format!("{tracker}: {e}")),
            Ok(other) => Err(format!("{tracker}: unexpected answer {other:?}")),
            Err(e) => Err(format!("reading from {tracker}: {e}")),
        }
    })?;
    if json {
        println!(
            "{{\"files\": {}, \"peers\": {}, \"holdings\": {}, \"requests\": {}}}",
            stats.files, stats.peers, stats.holdings, stats.requests
        );
    } else {
        println!(
            "files: {}\npeers: {}\nholdings: {}\nrequests served: {}",
            stats.files, stats.peers, stats.holdings, stats.requests
        );
    }
    Ok(())
}
