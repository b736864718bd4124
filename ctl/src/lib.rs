//! `p2pctl`'s library: the client side of the control socket, and the prose and JSON each
//! command prints. `main.rs` holds the command line.
//!
//! Prose follows the prototype's words (`Registration of doug.png of size 107330 bytes
//! successful.`); `--json` prints one JSON document per command instead (see the README).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use interprocess::local_socket::tokio::{prelude::*, Stream};
use interprocess::local_socket::GenericFilePath;
use p2p_schema::{
    format_ranges, CtlRequest, CtlResponse, DownloadState, FileSummary, FrameError, FrameReader,
    FrameWriter, Holder, StatusReport, PROTOCOL_VERSION,
};
use serde::Serialize;
use tokio::io::{ReadHalf, WriteHalf};

/// A failed command: what to print on stderr.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The daemon is not there.
    #[error("no daemon at {0}: is p2pd running? (start it with 'systemctl --user start p2pd' or 'p2pd --daemon', or point --socket at its socket)")]
    NoDaemon(String),
    /// The socket is there but belongs to someone else.
    #[error("permission denied on {0}: only the user running the daemon may control it")]
    Forbidden(String),
    /// The daemon refused the command.
    #[error("{0}")]
    Refused(p2p_schema::WireError),
    /// A name matched several files.
    #[error("{}", ambiguous_line(.query, .candidates))]
    Ambiguous {
        query: String,
        candidates: Vec<FileSummary>,
    },
    /// Talking to the daemon failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A path given on the command line cannot be used; nothing was sent for it.
    #[error(transparent)]
    Local(#[from] LocalError),
}

/// Talking to the daemon failed after the connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("sending to the daemon: {0}")]
    Send(#[source] FrameError),
    #[error("reading from the daemon: {0}")]
    Receive(#[source] FrameError),
    #[error("the daemon closed the connection (did it stop?)")]
    Closed,
    /// An answer that does not fit the command.
    #[error("unexpected answer from the daemon: {0:?}")]
    Unexpected(Box<CtlResponse>),
}

/// Something on this machine, not the daemon, stood in the way.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The path cannot be made absolute.
    #[error("{}: {source}", .path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon takes paths as UTF-8 text.
    #[error("{}: paths that are not valid UTF-8 are not supported; rename it", .0.display())]
    NotUtf8(PathBuf),
    /// `p2pctl man` could not render the page.
    #[error("rendering the manual: {0}")]
    Manual(#[source] std::io::Error),
}

/// `path` made absolute, as the UTF-8 text the daemon expects.
pub fn absolute(path: &Path) -> Result<String, LocalError> {
    let abs = std::path::absolute(path).map_err(|source| LocalError::Path {
        path: path.to_path_buf(),
        source,
    })?;
    abs.into_os_string()
        .into_string()
        .map_err(|p| LocalError::NotUtf8(PathBuf::from(p)))
}

fn ambiguous_line(query: &str, candidates: &[FileSummary]) -> String {
    let ids: Vec<String> = candidates
        .iter()
        .map(|c| format!("{} ({} bytes)", c.id, c.size))
        .collect();
    format!(
        "{query:?} matches {} files; choose one by ID (a unique prefix will do): {}",
        candidates.len(),
        ids.join(", ")
    )
}

/// An open, greeted connection to the daemon.
pub struct Client {
    reader: FrameReader<ReadHalf<Stream>>,
    writer: FrameWriter<WriteHalf<Stream>>,
}

impl Client {
    /// Connects to the daemon at `socket` and exchanges hellos.
    pub async fn connect(socket: &Path) -> Result<Client, CtlError> {
        let shown = socket.display().to_string();
        let name = socket
            .to_fs_name::<GenericFilePath>()
            .map_err(|_| CtlError::NoDaemon(shown.clone()))?;
        let stream = Stream::connect(name).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => CtlError::Forbidden(shown.clone()),
            _ => CtlError::NoDaemon(shown.clone()),
        })?;
        let (r, w) = tokio::io::split(stream);
        let mut client = Client {
            reader: FrameReader::new(r, p2p_schema::frame::MAX_CTL_ANSWER),
            writer: FrameWriter::new(w),
        };
        client
            .send(&CtlRequest::Hello {
                version: PROTOCOL_VERSION,
                agent: p2p_schema::agent("p2pctl"),
            })
            .await?;
        match client.next().await? {
            CtlResponse::Welcome { .. } => Ok(client),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a request.
    pub async fn send(&mut self, request: &CtlRequest) -> Result<(), CtlError> {
        self.writer
            .send(request)
            .await
            .map_err(|e| ProtocolError::Send(e).into())
    }

    /// The next response; error replies become `Err`.
    pub async fn next(&mut self) -> Result<CtlResponse, CtlError> {
        match self.reader.recv::<CtlResponse>().await {
            Ok(Some(CtlResponse::Error(e))) => Err(CtlError::Refused(e)),
            Ok(Some(CtlResponse::Ambiguous { query, candidates })) => {
                Err(CtlError::Ambiguous { query, candidates })
            }
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(ProtocolError::Closed.into()),
            Err(e) => Err(ProtocolError::Receive(e).into()),
        }
    }

    /// Sends `request` and returns its single response.
    pub async fn call(&mut self, request: CtlRequest) -> Result<CtlResponse, CtlError> {
        self.send(&request).await?;
        self.next().await
    }
}

/// An answer that does not fit the command.
pub fn unexpected(r: CtlResponse) -> CtlError {
    ProtocolError::Unexpected(Box::new(r)).into()
}

/// `(1) Name: doug.png Size: 107330 bytes ID: 3f2a…` lines under a count.
pub fn format_list(files: &[FileSummary]) -> String {
    let mut out = format!(
        "There are currently {} files in the network.\n",
        files.len()
    );
    for (i, f) in files.iter().enumerate() {
        if f.collection {
            // The tracker knows the size of the tree's index, not of the tree.
            let _ = writeln!(
                out,
                "({}) Name: {}/ (a directory) ID: {}",
                i + 1,
                f.name,
                f.id
            );
            continue;
        }
        let _ = writeln!(
            out,
            "({}) Name: {} Size: {} bytes ID: {}",
            i + 1,
            f.name,
            f.size,
            f.id
        );
    }
    out
}

/// `There are 2 endpoints seeding this file.` then one line per peer.
pub fn format_locate(holders: &[Holder]) -> String {
    let mut out = format!("There are {} endpoints seeding this file.\n", holders.len());
    for h in holders {
        let _ = writeln!(
            out,
            "Peer {} currently has chunks {}.",
            h.addr,
            format_ranges(h.chunks.iter())
        );
    }
    out
}

use p2p_service::HumanBytes;

/// A download's state as `status` says it.
fn state_word(state: &DownloadState) -> String {
    match state {
        DownloadState::Running => "running".to_string(),
        DownloadState::Paused => "paused".to_string(),
        DownloadState::Complete => "complete".to_string(),
        DownloadState::Failed(why) => format!("failed: {why}"),
    }
}

/// The collections section of `status`: one line per shared or downloading directory.
fn format_collections(out: &mut String, collections: &[p2p_schema::CollectionStatus]) {
    if !collections.is_empty() {
        let _ = writeln!(out, "Directories: {}", collections.len());
    }
    for c in collections {
        let state = match (&c.state, &c.blocked) {
            (DownloadState::Running, Some(why)) => format!("stalled: {why}"),
            (state, _) => state_word(state),
        };
        let _ = writeln!(
            out,
            "  {}  {}/  {}/{} files  {}/{}  {}  uploaded {}  {}",
            c.id.short(),
            c.name,
            c.files_done,
            c.files,
            HumanBytes(c.bytes_done),
            HumanBytes(c.bytes),
            state,
            HumanBytes(c.uploaded),
            c.path
        );
    }
}

/// The `status` report in prose.
pub fn format_status(s: &StatusReport) -> String {
    let tracker = match (&s.tracker_problem, s.tracker_connected) {
        (_, true) => "connected".to_string(),
        (Some(why), false) => format!("not connected: {why}"),
        (None, false) => "not connected".to_string(),
    };
    let mut out = format!(
        "Peer {} ({}), tracker {} ({tracker})\n",
        s.info.listen,
        s.info.peer_id.short(),
        s.info.tracker,
    );
    if let Some(key) = &s.info.key {
        let swarm = if s.info.closed { "closed" } else { "open" };
        let _ = writeln!(out, "Key {key} ({swarm} swarm)");
    }
    if let Some(addr) = s.info.metrics {
        let _ = writeln!(out, "Metrics http://{addr}/metrics");
    }
    let _ = writeln!(out, "Sharing {} files:", s.shares.len());
    for f in &s.shares {
        let _ = write!(
            out,
            "  {}  {}  {}  {}  uploaded {}",
            f.id.short(),
            f.name,
            HumanBytes(f.size),
            f.path,
            HumanBytes(f.uploaded)
        );
        if let Some(p) = &f.problem {
            let _ = write!(out, "  NOT SERVED: {p}");
        }
        out.push('\n');
    }
    format_collections(&mut out, &s.collections);
    let _ = writeln!(out, "Downloads: {}", s.downloads.len());
    for d in &s.downloads {
        let pct = if d.chunks == 0 {
            100.0
        } else {
            f64::from(d.have) * 100.0 / f64::from(d.chunks)
        };
        let state = match &d.state {
            DownloadState::Running if d.blocked.is_some() => {
                format!("stalled: {}", d.blocked.as_deref().unwrap_or_default())
            }
            DownloadState::Running if d.stalled > 0 => {
                format!("stalled: {} chunks have no live holder", d.stalled)
            }
            other => state_word(other),
        };
        let _ = writeln!(
            out,
            "  {}  {}  {}  {}/{} chunks ({pct:.0}%)  {}/s from {} peers  {}  -> {}",
            d.id.short(),
            d.name,
            HumanBytes(d.size),
            d.have,
            d.chunks,
            HumanBytes(d.rate),
            d.peers,
            state,
            d.output
        );
    }
    out
}

/// A holder as `--json` shows it: chunk numbers 1-based, like the prose.
#[derive(Serialize)]
pub struct JsonHolder {
    pub peer_id: String,
    pub addr: String,
    pub chunks: Vec<u32>,
}

impl From<&Holder> for JsonHolder {
    fn from(h: &Holder) -> Self {
        JsonHolder {
            peer_id: h.peer_id.to_hex(),
            addr: h.addr.to_string(),
            chunks: h.chunks.iter().map(|i| i + 1).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_schema::{Bitfield, FileId, PeerId};

    fn summary() -> FileSummary {
        FileSummary {
            collection: false,
            id: FileId([0x3f; 32]),
            name: "doug.png".into(),
            size: 107_330,
            chunk_size: 16384,
            chunks: 7,
            seeders: 1,
            holders: 1,
        }
    }

    #[test]
    fn list_reads_like_the_prototype() {
        let s = format_list(&[summary()]);
        assert!(s.starts_with("There are currently 1 files in the network.\n"));
        assert!(s.contains("(1) Name: doug.png Size: 107330 bytes ID: 3f3f3f"));
    }

    #[test]
    fn locate_reads_like_the_prototype() {
        let h = Holder {
            peer_id: PeerId([1; 16]),
            addr: "127.0.0.1:54374".parse().unwrap(),
            chunks: Bitfield::full(7),
            complete: true,
        };
        let s = format_locate(&[h]);
        assert_eq!(
            s,
            "There are 1 endpoints seeding this file.\nPeer 127.0.0.1:54374 currently has chunks [1, 2, 3, 4, 5, 6, 7].\n"
        );
    }

    #[test]
    fn ambiguity_names_every_candidate() {
        let mut b = summary();
        b.id = FileId([0xaa; 32]);
        let e = CtlError::Ambiguous {
            query: "doug.png".into(),
            candidates: vec![summary(), b],
        };
        let line = e.to_string();
        assert!(line.contains("matches 2 files"));
        assert!(line.contains(&FileId([0x3f; 32]).to_hex()));
        assert!(line.contains(&FileId([0xaa; 32]).to_hex()));
        assert!(!line.contains('\n'));
    }
}
