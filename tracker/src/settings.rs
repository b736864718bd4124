//! `p2p-tracker`'s settings: flags, `P2P_TRACKER_*` environment, configuration file and
//! defaults, merged in that order of precedence. `p2p-tracker --print-config` shows them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Config, DEFAULT_TTL};

/// Where peers connect unless told otherwise.
const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7070);

/// Every setting, optional until merged; read from flags (with environment) and from TOML.
#[derive(Debug, Default, Clone, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// TCP address peers connect to [default: 127.0.0.1:7070].
    #[arg(long, env = "P2P_TRACKER_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Directory for the registry database [default: $STATE_DIRECTORY under systemd, else
    /// $XDG_DATA_HOME/p2p-tracker or ~/.local/share/p2p-tracker].
    #[arg(long, env = "P2P_TRACKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Drop a peer not heard from for this long, e.g. 30s or 500ms [default: 30s].
    #[arg(long, env = "P2P_TRACKER_TTL")]
    pub ttl: Option<String>,

    /// Swarm secret: makes the swarm closed. Every session must prove it holds the same
    /// secret (it never crosses the wire) and is encrypted. Without one the tracker is open to
    /// anyone who can reach it (prefer secret-file: flags are visible in the process list).
    #[arg(long, env = "P2P_TRACKER_SECRET", hide_env_values = true)]
    #[serde(skip_serializing)]
    pub secret: Option<p2p_service::Secret>,

    /// Read the swarm secret from this file (first line).
    #[arg(long, env = "P2P_TRACKER_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,

    /// Record the IP address a peer announces (its --advertise) instead of the one its
    /// session comes from. Always so in a closed swarm [default: false].
    #[arg(long, env = "P2P_TRACKER_TRUST_ADVERTISED", num_args = 0..=1, default_missing_value = "true")]
    pub trust_advertised: Option<bool>,

    /// Most files one peer may register or hold at once [default: 100000].
    #[arg(long, env = "P2P_TRACKER_MAX_FILES_PER_PEER")]
    pub max_files_per_peer: Option<usize>,

    /// Serve metrics in the Prometheus text format at http://ADDR/metrics [default: none].
    #[arg(long, env = "P2P_TRACKER_METRICS")]
    pub metrics: Option<SocketAddr>,

    /// Log level or filter; RUST_LOG overrides it [default: info].
    #[arg(long, env = "P2P_TRACKER_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// With --daemon: the pid file [default: p2p-tracker.pid in the data directory].
    #[arg(long, env = "P2P_TRACKER_PID_FILE")]
    pub pid_file: Option<PathBuf>,

    /// With --daemon: the log file [default: p2p-tracker.log in the data directory].
    #[arg(long, env = "P2P_TRACKER_LOG_FILE")]
    pub log_file: Option<PathBuf>,
}

p2p_service::settings_or!(Settings {
    listen,
    data_dir,
    ttl,
    secret,
    secret_file,
    trust_advertised,
    max_files_per_peer,
    metrics,
    log_level,
    pid_file,
    log_file,
});

impl Settings {
    /// The defaults: the one place they are written. Several paths live in the data directory.
    fn defaults(data_dir: &Path) -> Settings {
        Settings {
            listen: Some(DEFAULT_LISTEN),
            data_dir: Some(data_dir.to_path_buf()),
            ttl: Some(format!("{}s", DEFAULT_TTL.as_secs())),
            secret: None,
            secret_file: None,
            trust_advertised: Some(false),
            max_files_per_peer: Some(crate::registry::DEFAULT_MAX_FILES_PER_PEER),
            metrics: None,
            log_level: Some("info".into()),
            pid_file: Some(data_dir.join("p2p-tracker.pid")),
            log_file: Some(data_dir.join("p2p-tracker.log")),
        }
    }

    /// Merges flags, the file and defaults; makes paths absolute; checks values.
    pub fn resolve(flags: Settings, file: Settings) -> Result<Settings, String> {
        let given = flags.or(file);
        let data_dir = given
            .data_dir
            .clone()
            .unwrap_or_else(|| p2p_service::data_dir_for("p2p-tracker"));
        let data_dir = p2p_service::absolute(&data_dir)?;
        let mut s = given.or(Settings::defaults(&data_dir));
        s.data_dir = Some(data_dir);
        for p in [&mut s.secret_file, &mut s.pid_file, &mut s.log_file]
            .into_iter()
            .flatten()
        {
            *p = p2p_service::absolute(p)?;
        }
        if let Some(t) = &s.ttl {
            p2p_service::parse_duration(t).map_err(|e| format!("ttl: {e}"))?;
        }
        Ok(s)
    }

    /// The address to listen on (resolved settings always name one).
    pub fn listen(&self) -> SocketAddr {
        self.listen.unwrap_or(DEFAULT_LISTEN)
    }

    /// The running configuration (reads the secret file, if any).
    pub fn to_config(&self) -> Result<Config, String> {
        let mut config = Config::default();
        if let Some(t) = &self.ttl {
            config.ttl = p2p_service::parse_duration(t)?;
        }
        config.swarm =
            p2p_service::identity::swarm_key(self.secret.as_ref(), self.secret_file.as_deref())?;
        config.trust_advertised = self.trust_advertised.unwrap_or(false);
        config.max_files_per_peer = self
            .max_files_per_peer
            .unwrap_or(crate::registry::DEFAULT_MAX_FILES_PER_PEER)
            .max(1);
        config.metrics = self.metrics;
        Ok(config)
    }
}

p2p_service::service_settings!(Settings, "p2p-tracker");
