//! `p2pd`'s settings: flags, environment, configuration file and defaults, merged in that
//! order of precedence (a flag beats `P2PD_*` in the environment, which beats the file, which
//! beats the defaults). `p2pd --print-config` shows the result.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Config;

/// Every setting, each optional until merged. The same struct is read from the command line
/// (with environment variables) and from the TOML file (keys in kebab-case, as the flags).
#[derive(Debug, Default, Clone, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// The tracker's address (host:port), or several, comma-separated: each file's record is
    /// kept on --tracker-replicas of them (give every daemon the same list)
    /// [default: 127.0.0.1:7070].
    #[arg(long, env = "P2PD_TRACKER")]
    pub tracker: Option<String>,

    /// TCP address other peers fetch chunks from; port 0 picks a free one and the tracker is
    /// told the real one [default: 0.0.0.0:0].
    #[arg(long, env = "P2PD_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Directory for the daemon's database [default: $STATE_DIRECTORY under systemd, else
    /// $XDG_DATA_HOME/p2pd or ~/.local/share/p2pd].
    #[arg(long, env = "P2PD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Control socket for p2pctl [default: $RUNTIME_DIRECTORY/p2pd.sock under systemd, else
    /// p2pd.sock in the data directory].
    #[arg(long, env = "P2PD_SOCKET")]
    pub socket: Option<PathBuf>,

    /// Where downloads go unless p2pctl names an output [default: downloads/ in the data
    /// directory].
    #[arg(long, env = "P2PD_DOWNLOAD_DIR")]
    pub download_dir: Option<PathBuf>,

    /// Address to announce to the tracker instead of the bound one (behind NAT, say). A
    /// tracker takes its IP only in a closed swarm or with --trust-advertised; otherwise it
    /// records the address the session comes from, with this port.
    #[arg(long, env = "P2PD_ADVERTISE")]
    pub advertise: Option<SocketAddr>,

    /// Swarm secret of a closed swarm: the tracker and every peer must hold the same one
    /// (it never crosses the wire), and every link is encrypted (prefer secret-file: flags
    /// are visible to other users in the process list).
    #[arg(long, env = "P2PD_SECRET", hide_env_values = true)]
    #[serde(skip_serializing)]
    pub secret: Option<p2p_service::Secret>,

    /// Read the swarm secret from this file (first line).
    #[arg(long, env = "P2PD_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,

    /// The tracker's public key (hex, as in its tracker.pub): a tracker with another key is
    /// refused. With several trackers, one key per tracker, comma-separated, in order.
    #[arg(long, env = "P2PD_TRACKER_KEY")]
    pub tracker_key: Option<String>,

    /// On how many of the trackers each file's record is kept [default: 2].
    #[arg(long, env = "P2PD_TRACKER_REPLICAS")]
    pub tracker_replicas: Option<usize>,

    /// Encrypt peer links in an open swarm too, and refuse plain ones (a closed swarm always
    /// encrypts) [default: false].
    #[arg(long, env = "P2PD_ENCRYPT", num_args = 0..=1, default_missing_value = "true")]
    pub encrypt: Option<bool>,

    /// Give up on a peer that sends less than 16 KiB in this long while a chunk is awaited
    /// [default: 20s].
    #[arg(long, env = "P2PD_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,

    /// Chunk requests in flight per peer, at most [default: 16].
    #[arg(long, env = "P2PD_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,

    /// Upload at most this many bytes per second; 0 is unlimited [default: 0].
    #[arg(long, env = "P2PD_UPLOAD_RATE")]
    pub upload_rate: Option<u64>,

    /// Serve metrics in the Prometheus text format at http://ADDR/metrics (bind it to
    /// loopback or a management network: they name the files shared) [default: none].
    #[arg(long, env = "P2PD_METRICS")]
    pub metrics: Option<SocketAddr>,

    /// Log level or filter; RUST_LOG overrides it [default: info].
    #[arg(long, env = "P2PD_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// With --daemon: the pid file [default: p2pd.pid in the data directory].
    #[arg(long, env = "P2PD_PID_FILE")]
    pub pid_file: Option<PathBuf>,

    /// With --daemon: the log file [default: p2pd.log in the data directory].
    #[arg(long, env = "P2PD_LOG_FILE")]
    pub log_file: Option<PathBuf>,
}

p2p_service::settings_or!(Settings {
    tracker,
    listen,
    data_dir,
    socket,
    download_dir,
    advertise,
    secret,
    secret_file,
    tracker_key,
    tracker_replicas,
    encrypt,
    request_timeout,
    max_in_flight,
    upload_rate,
    metrics,
    log_level,
    pid_file,
    log_file,
});

/// Keys as `--tracker-key` takes them: comma-separated.
fn parse_keys(text: &str) -> Result<Vec<[u8; 32]>, String> {
    crate::split_list(text)
        .iter()
        .map(|k| parse_key(k))
        .collect()
}

/// A public key as `--tracker-key` takes it: 64 hex digits.
fn parse_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(text.trim()).ok();
    bytes
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| format!("tracker-key: {text:?} is not a key: expected 64 hex digits"))
}

impl Settings {
    /// The defaults, given the data directory (which several paths live in).
    fn defaults(data_dir: &Path) -> Settings {
        Settings {
            tracker: Some("127.0.0.1:7070".into()),
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 0))),
            data_dir: Some(data_dir.to_path_buf()),
            socket: Some(
                p2p_service::runtime_dir()
                    .map(|d| d.join("p2pd.sock"))
                    .unwrap_or_else(|| p2p_service::socket_in(data_dir)),
            ),
            download_dir: Some(data_dir.join("downloads")),
            advertise: None,
            secret: None,
            secret_file: None,
            tracker_key: None,
            tracker_replicas: Some(crate::tracker_client::DEFAULT_REPLICAS),
            encrypt: Some(false),
            request_timeout: Some("20s".into()),
            max_in_flight: Some(16),
            upload_rate: Some(0),
            metrics: None,
            log_level: Some("info".into()),
            pid_file: Some(data_dir.join("p2pd.pid")),
            log_file: Some(data_dir.join("p2pd.log")),
        }
    }

    /// Merges flags (with environment), then the configuration file, then defaults, and
    /// makes every path absolute.
    pub fn resolve(flags: Settings, file: Settings) -> Result<Settings, String> {
        let given = flags.or(file);
        let data_dir = given
            .data_dir
            .clone()
            .unwrap_or_else(p2p_service::default_data_dir);
        let data_dir = p2p_service::absolute(&data_dir)?;
        let mut s = given.or(Settings::defaults(&data_dir));
        s.data_dir = Some(data_dir);
        for p in [
            &mut s.socket,
            &mut s.download_dir,
            &mut s.secret_file,
            &mut s.pid_file,
            &mut s.log_file,
        ]
        .into_iter()
        .flatten()
        {
            *p = p2p_service::absolute(p)?;
        }
        if let Some(t) = &s.request_timeout {
            p2p_service::parse_duration(t).map_err(|e| format!("request-timeout: {e}"))?;
        }
        let trackers = crate::split_list(s.tracker.as_deref().unwrap_or_default());
        if trackers.is_empty() {
            return Err("tracker: no tracker address given".into());
        }
        if let Some(keys) = &s.tracker_key {
            let keys = parse_keys(keys)?;
            if keys.len() != trackers.len() {
                return Err(format!(
                    "tracker-key: {} keys for {} trackers: give one per tracker, in order",
                    keys.len(),
                    trackers.len()
                ));
            }
        }
        Ok(s)
    }

    /// The running configuration (reads the secret file, if any).
    pub fn to_config(&self) -> Result<Config, String> {
        let get = |o: &Option<PathBuf>| o.clone().unwrap_or_default();
        let mut config = Config::new(
            self.tracker.as_deref().unwrap_or_default(),
            get(&self.data_dir),
        );
        config.tracker_replicas = self
            .tracker_replicas
            .unwrap_or(crate::tracker_client::DEFAULT_REPLICAS)
            .max(1);
        config.socket = get(&self.socket);
        config.download_dir = get(&self.download_dir);
        config.advertise = self.advertise;
        config.swarm =
            p2p_service::identity::swarm_key(self.secret.as_ref(), self.secret_file.as_deref())?;
        config.tracker_keys = match &self.tracker_key {
            Some(keys) => parse_keys(keys)?,
            None => Vec::new(),
        };
        config.encrypt = self.encrypt.unwrap_or(false);
        if let Some(t) = &self.request_timeout {
            config.request_timeout = p2p_service::parse_duration(t)?;
        }
        config.max_in_flight = self.max_in_flight.unwrap_or(16).max(1);
        config.upload_rate = self.upload_rate.unwrap_or(0);
        config.metrics = self.metrics;
        Ok(config)
    }
}

p2p_service::service_settings!(Settings, "p2pd");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let flags = Settings {
            tracker: Some("flag:1".into()),
            ..Settings::default()
        };
        let file: Settings =
            toml::from_str("tracker = \"file:1\"\nupload-rate = 5\ndata-dir = \"/srv/p2pd\"\n")
                .unwrap();
        let s = Settings::resolve(flags, file).unwrap();
        assert_eq!(s.tracker.as_deref(), Some("flag:1"));
        assert_eq!(s.upload_rate, Some(5));
        assert_eq!(s.max_in_flight, Some(16));
        assert_eq!(s.download_dir, Some(PathBuf::from("/srv/p2pd/downloads")));
        let c = s.to_config().unwrap();
        assert_eq!(c.upload_rate, 5);
        assert_eq!(c.trackers, vec!["flag:1".to_string()]);
        assert_eq!(c.tracker_replicas, 2);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<Settings>("trackr = \"x\"").is_err());
        let bad = Settings {
            request_timeout: Some("soon".into()),
            ..Settings::default()
        };
        assert!(Settings::resolve(bad, Settings::default()).is_err());
    }

    #[test]
    fn the_secret_is_never_printed() {
        let s = Settings {
            secret: Some("hunter2".into()),
            ..Settings::default()
        };
        let text = Settings::resolve(s, Settings::default()).unwrap();
        let text = p2p_service::lifecycle::ServiceSettings::to_toml(&text);
        assert!(!text.contains("hunter2"));
        assert!(text.contains("secret = (set, not shown)"));
    }
}
