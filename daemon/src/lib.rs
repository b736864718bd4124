//! `p2pd`: the peer daemon. It shares registered files, downloads files from the swarm
//! (serving every verified chunk at once), keeps its state in sled, and takes commands from
//! `p2pctl` over a local socket.
//!
//! # Layout
//! Each part uses only those listed after it (see `ARCHITECTURE.md` at the repository root).
//! - [`start`]: start-up and shutdown: builds the parts, runs them, stops them in order.
//! - [`control`]: the control socket and the commands `p2pctl` sends.
//! - [`serve`]: the peer server: chunks to other daemons, its limits and hold-back policy.
//!   Its rate limiter is `pace`.
//! - [`node`]: [`node::Node`], the catalog of local files, the download manager, and
//!   bringing back an earlier run's state.
//! - [`download`]: one download: coordinator, workers, picker, committer, stalls.
//! - [`context`]: what every part shares: settings, identity, database, tracker session.
//! - [`link`]: a connection to another daemon, plain or secure.
//! - [`local`]: [`local::LocalFile`], a file whose chunks this daemon can serve.
//! - [`spans`]: a collection's pack as spans of the files it packs, which serve it.
//! - [`part`]: a download's partial file: exclusive creation, no-replace rename.
//! - [`register`]: hashing a local file into a manifest, off the async executor.
//! - [`recover`]: re-verifying unrecorded chunks after an unclean stop.
//! - [`tracker_client`]: the long-lived tracker session, reconnecting and re-announcing.
//! - [`store`]: the sled database (identity, shares, downloads, chunk inventory).
//! - [`fileio`]: every OS-specific file call (positioned I/O, `sendfile`, direct I/O).
//! - [`settings`]: flags, environment, configuration file and defaults, merged.
//!
//! See `daemon/STATE.md` for the chunk state machine and the crash-consistency ordering.

pub mod aligned;
pub mod context;
pub mod control;
pub mod download;
pub mod fileio;
pub mod link;
pub mod local;
pub mod metrics;
pub mod node;
mod pace;
pub mod part;
pub mod recover;
pub mod register;
pub mod serve;
pub mod settings;
pub mod spans;
pub mod start;
pub mod store;
pub mod tracker_client;

use p2p_schema::secure::SwarmKey;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use node::Node;
pub use start::run;

/// Locks `m`. A panic while it was held does not make its data unusable here (every
/// critical section leaves it consistent), so poisoning is ignored.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Locks `l` for reading; poisoning is ignored (see [`lock`]).
pub(crate) fn read_lock<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Locks `l` for writing; poisoning is ignored (see [`lock`]).
pub(crate) fn write_lock<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Errors of the daemon's own operations (as opposed to errors reported to `p2pctl`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Db(String, #[source] sled::Error),
    #[error(transparent)]
    Key(#[from] p2p_service::identity::KeyError),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Error {
        Error::Io(what.into(), e)
    }
}

/// The items of a comma-separated list, trimmed, empty ones left out.
pub fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Settings of a running daemon.
#[derive(Debug, Clone)]
pub struct Config {
    /// The trackers' addresses (`host:port`), in the order configured (the same list on every
    /// daemon: each file's trackers are chosen from it by rendezvous hashing).
    pub trackers: Vec<String>,
    /// On how many of the trackers each file's record is kept.
    pub tracker_replicas: usize,
    /// Directory for the database (and, by default, the socket and downloads).
    pub data_dir: PathBuf,
    /// The control socket's path.
    pub socket: PathBuf,
    /// Where downloads go when `p2pctl download` names no output.
    pub download_dir: PathBuf,
    /// The key of a closed swarm (from its secret): every link and the tracker session
    /// prove it. `None`: an open swarm.
    pub swarm: Option<SwarmKey>,
    /// Encrypt peer links in an open swarm too (always so in a closed one).
    pub encrypt: bool,
    /// The trackers' public keys, if pinned (one per tracker, in order): a tracker with
    /// another key is refused.
    pub tracker_keys: Vec<[u8; 32]>,
    /// Address to announce instead of the bound one (e.g. behind NAT); `None`: the bound one.
    pub advertise: Option<SocketAddr>,
    /// How long to wait for one chunk from a peer before giving up on that peer.
    pub request_timeout: Duration,
    /// Chunk requests kept in flight per peer, at most.
    pub max_in_flight: usize,
    /// Chunk reads into memory for uploads at the same time, at most (bounds memory). Only
    /// where `sendfile` is unavailable: on Linux chunks go from the page cache to the socket.
    pub max_uploads: usize,
    /// Bytes per second this daemon uploads at most (0: unlimited). For tests and slow links.
    pub upload_rate: u64,
    /// Where metrics are served (`http://ADDR/metrics`); once bound, the bound address.
    pub metrics: Option<SocketAddr>,
}

impl Config {
    /// Defaults for everything but the trackers (a comma-separated list) and data directory.
    pub fn new(trackers: &str, data_dir: PathBuf) -> Config {
        Config {
            trackers: split_list(trackers),
            tracker_replicas: tracker_client::DEFAULT_REPLICAS,
            socket: p2p_service::socket_in(&data_dir),
            download_dir: data_dir.join("downloads"),
            data_dir,
            swarm: None,
            encrypt: false,
            tracker_keys: Vec::new(),
            advertise: None,
            request_timeout: Duration::from_secs(20),
            max_in_flight: 16,
            max_uploads: 32,
            upload_rate: 0,
            metrics: None,
        }
    }
}

/// Gives the memory a finished download freed back to the system. glibc keeps freed memory
/// for reuse, scattered over its arenas: a tree of many files, downloaded one after another,
/// would otherwise hold half again what one file needs (measured: 34 MiB against 23 MiB for
/// 64 files of 16 MiB; 23 MiB with this).
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory the allocator holds; it takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}
