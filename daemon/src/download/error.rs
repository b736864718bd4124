//! Why a worker stopped: typed, so the download can tell the network's faults, a peer's,
//! and ours apart.

use super::*;

/// Why a worker stopped fetching from its peer.
#[derive(Debug, thiserror::Error)]
pub(super) enum WorkerError {
    /// The peer could not be reached, or the connection broke: tried again after a wait.
    #[error("{0}")]
    Unreachable(String),
    /// The peer broke the protocol, refused chunk after chunk, or stopped sending: a fault.
    #[error("{0}")]
    Misbehaved(String),
    /// It sent chunks that failed verification this many times: banned from this download.
    #[error("it sent bad data {0} times")]
    BadData(u32),
    /// A verified chunk could not be written here: the download stalls until it can.
    #[error("{0}")]
    Write(WriteError),
    /// A fault of ours (a task that panicked, a bookkeeping slip).
    #[error("{0}")]
    Internal(String),
}

/// A frame error on a peer connection: a closed connection is the network's doing, anything
/// else (a malformed or oversized frame) the peer's.
pub(super) fn net(e: p2p_schema::FrameError) -> WorkerError {
    if e.is_disconnect() {
        WorkerError::Unreachable(e.to_string())
    } else {
        WorkerError::Misbehaved(e.to_string())
    }
}

/// A chunk write that failed, explained for `status` and an attached `p2pctl download`.
#[derive(Debug, Clone)]
pub struct WriteError {
    /// The directory of the partial file (where space or permission is missing).
    pub dir: PathBuf,
    pub kind: std::io::ErrorKind,
    pub message: String,
}

impl WriteError {
    pub(super) fn new(dl: &Download, index: u32, e: &std::io::Error) -> WriteError {
        let dir = dl
            .part
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        WriteError {
            dir,
            kind: e.kind(),
            message: format!("writing chunk {index} to {}: {e}", dl.part.display()),
        }
    }

    /// Is the device full?
    pub(super) fn is_full(&self) -> bool {
        self.kind == std::io::ErrorKind::StorageFull
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Why a download failed for good (its state becomes `failed: ` and this message).
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Written chunks could not be made durable (synced or recorded).
    #[error("cannot write {}: see the daemon log", .0.display())]
    Commit(PathBuf),
    /// Something took the output path while the download ran; nothing was replaced.
    #[error("{} appeared while downloading; the data is kept at {}", .output.display(), .part.display())]
    Appeared { output: PathBuf, part: PathBuf },
    /// A file operation of the finish failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The state database refused a write.
    #[error("recording the download: {0}")]
    Store(#[from] crate::Error),
    /// A task of ours ended badly (a panic).
    #[error("{0}")]
    Internal(String),
}
