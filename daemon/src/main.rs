//! `p2pd`: settings, logging, `--daemon`, runtime, then [`p2pd::run`].
//!
//! `main` is a plain function that stays free of threads until the runtime is built, so that
//! `--daemon` can fork safely first.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use p2p_service::lifecycle::{self as service, Readiness};
use p2pd::settings::Settings;
use tracing::info;

/// The p2p peer daemon: shares files, downloads them from the swarm, serves p2pctl.
///
/// Settings come from flags, then P2PD_* environment variables, then the configuration file,
/// then defaults. Run it in the foreground (as systemd expects), or detach with --daemon.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    #[command(flatten)]
    settings: Settings,

    /// Configuration file (TOML, keys as the flags) [default: $CONFIGURATION_DIRECTORY/
    /// config.toml under systemd, else ~/.config/p2pd/config.toml, if it exists].
    #[arg(long, env = "P2PD_CONFIG")]
    config: Option<PathBuf>,

    /// Print the effective settings (as a configuration file) and exit.
    #[arg(long)]
    print_config: bool,

    /// Detach into the background; returns once the daemon is ready (or says why not).
    #[arg(long)]
    daemon: bool,
}

fn main() -> ExitCode {
    map_large_buffers();
    let args = Args::parse();
    let (settings, mut readiness) = match service::start(
        args.settings,
        args.config.as_deref(),
        args.print_config,
        args.daemon,
    ) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let listen = settings
        .listen
        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let result = settings
        .to_config()
        .and_then(|config| serve(config, listen, &mut readiness));
    service::finish("p2pd", result, &mut readiness)
}

/// Chunk buffers (64 KiB to 16 MiB, one set per download) and the pack's 4 MiB blocks come
/// and go with each download. glibc maps large allocations on their own and unmaps them when
/// freed, but after the first such free it raises that threshold to the freed size, so later
/// buffers come from the heap, where they fragment it and stay resident when freed: a
/// collection of 64 files, downloaded one after another, peaked 19 % above one file of the
/// same size (8 GiB; 10 to 12 % with this). A fixed threshold keeps every large buffer mapped
/// on its own (downloads pool their buffers, so this costs few system calls).
fn map_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// The glibc default, fixed: allocations from 128 KiB up are mapped on their own.
        const MMAP_THRESHOLD: libc::c_int = 128 << 10;
        // SAFETY: `mallopt` only sets an allocator parameter; it is called before any thread
        // starts. It returns 0 on failure, which leaves the default in place.
        let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        debug_assert_eq!(set, 1, "mallopt(M_MMAP_THRESHOLD) failed");
    }
}

fn serve(
    config: p2pd::Config,
    listen: std::net::SocketAddr,
    readiness: &mut Readiness,
) -> Result<(), String> {
    service::runtime()?.block_on(async move {
        // Handlers first: a signal right after readiness must still stop us cleanly.
        let shutdown = service::shutdown_signal();
        let peers = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("binding peer address {listen}: {e}"))?;
        let control = p2pd::control::bind(&config.socket).map_err(|e| e.to_string())?;
        info!(trackers = %config.trackers.join(","), data_dir = %config.data_dir.display(), "starting");
        p2pd::run(config, peers, control, shutdown, |status| {
            readiness.ready(status)
        })
        .await
        .map_err(|e| e.to_string())
    })
}
