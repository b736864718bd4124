//! The messages of the three channels. Variant names are the wire names (ciborium writes enum
//! variants by name): never rename one; add new fields as `Option` with `#[serde(default)]`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{Bitfield, FileId, Manifest, PeerId};

/// Protocol version carried by every hello. A peer speaking another version is refused with
/// [`ErrorCode::UnsupportedVersion`]. Version 2 opened tracker connections (and closed-swarm
/// peer connections) with a secure session ([`crate::secure`]) and took the peer ID from it.
pub const PROTOCOL_VERSION: u32 = 2;

/// Stable error codes carried in error replies, for programs to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request was malformed or made no sense in this state.
    BadRequest,
    /// The hello carried a protocol version this side does not speak.
    UnsupportedVersion,
    /// No such file (or chunk, or peer).
    NotFound,
    /// A name matched several files.
    Ambiguous,
    /// The request needs a secret or permission the sender does not have.
    Unauthorized,
    /// A local file could not be read or written.
    Io,
    /// The tracker could not be reached.
    TrackerUnavailable,
    /// A limit was reached; try again later.
    Busy,
    /// Anything else.
    Internal,
}

/// An error reply: a stable code and a human-readable, one-line message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// What kind of error.
    pub code: ErrorCode,
    /// What happened, for people.
    pub message: String,
}

impl WireError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WireError {}

/// One registered file as the tracker lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSummary {
    /// Content identity.
    pub id: FileId,
    /// The name it was first registered under.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// Number of chunks.
    pub chunks: u32,
    /// Live peers holding the whole file.
    pub seeders: u32,
    /// Live peers holding some of it.
    pub holders: u32,
    /// A collection (a tree of files, see [`crate::Collection`]) rather than one file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub collection: bool,
}

/// One peer holding chunks of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The peer's identity.
    pub peer_id: PeerId,
    /// Where it serves chunks.
    pub addr: SocketAddr,
    /// Which chunks it has announced (empty, of length 0, in a brief `Locate` answer).
    pub chunks: Bitfield,
    /// It holds every chunk (false from trackers before it: then see `chunks`).
    #[serde(default)]
    pub complete: bool,
}

// ---------------------------------------------------------------------------------------------
// Tracker channel: p2pd -> p2p-tracker, one long-lived TCP connection per daemon.

/// Requests a daemon sends the tracker. The first must be [`TrackerRequest::Hello`]; the
/// tracker answers each request with exactly one [`TrackerResponse`], in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrackerRequest {
    /// Opens the session (inside the secure session, which says who the peer is): where the
    /// peer serves chunks. The tracker records the IP it sees the session come from with this
    /// port, unless it trusts announced addresses (closed swarms, or `--trust-advertised`)
    /// and this one has a specified IP.
    Hello {
        version: u32,
        listen: SocketAddr,
        agent: String,
    },
    /// Publishes a manifest and records the sender as holding every chunk. A `member` is
    /// held as one of a collection's files: the tracker finds it by its ID (so that whoever
    /// holds the same bytes, alone or in a tree, serves everyone who fetches them) but does
    /// not list it nor find it by name, which belong to the collection. Absent (false) from
    /// the requests of daemons older than it, and ignored by older trackers (which list it).
    Register {
        manifest: Manifest,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        member: bool,
    },
    /// Replaces what the sender holds of a file (registered before by someone).
    Have { file_id: FileId, chunks: Bitfield },
    /// Adds chunks to what the sender holds of a file.
    Gained { file_id: FileId, indices: Vec<u32> },
    /// The sender no longer holds anything of this file.
    Drop { file_id: FileId },
    /// All files with at least one live holder, in one answer ([`TrackerResponse::Files`]).
    /// Kept for daemons from before paging: the tracker answers at most
    /// [`LIST_UNPAGED_MAX`] files to it, so that the answer fits a frame. Use `ListPage`.
    List,
    /// Files whose ID is `query`, whose ID starts with `query`, or whose name is `query`.
    Find { query: String },
    /// The manifest of a file.
    GetManifest { file_id: FileId },
    /// Live holders of a file (at most `max`, shuffled), the sender included if it holds any of
    /// it (a downloader skips its own peer ID). With `brief`, each holder's `chunks` is empty
    /// (length 0) and only `complete` says what it holds: an answer of about 60 bytes a
    /// holder, whatever the file's size; the asker learns the rest from the peers themselves
    /// (`PeerRequest::Watch`). A tracker from before `brief` ignores it and sends bitfields.
    Locate {
        file_id: FileId,
        max: u32,
        #[serde(default)]
        brief: bool,
    },
    /// Keeps the session alive; sent every `heartbeat_ms`.
    Heartbeat,
    /// The sender leaves the network: drop its holdings now.
    Bye,
    /// Counters, for monitoring. May also be sent instead of a hello, without joining.
    Stats,
    /// One page of the files `List` would give, in the same order (by name, then ID): at most
    /// `limit` (capped at [`LIST_PAGE_MAX`]) of those after `after` (from the start if
    /// `None`). Answered with [`TrackerResponse::FilePage`]; ask again with its `next` until
    /// that is `None`. Only to a tracker whose welcome said `list_pages`.
    ListPage {
        #[serde(default)]
        after: Option<ListCursor>,
        limit: u32,
    },
}

impl TrackerRequest {
    /// The request's kind, in snake case, for logs and metrics (`locate`, `gained`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            TrackerRequest::Hello { .. } => "hello",
            TrackerRequest::Register { .. } => "register",
            TrackerRequest::Have { .. } => "have",
            TrackerRequest::Gained { .. } => "gained",
            TrackerRequest::Drop { .. } => "drop",
            TrackerRequest::List => "list",
            TrackerRequest::Find { .. } => "find",
            TrackerRequest::GetManifest { .. } => "get_manifest",
            TrackerRequest::Locate { .. } => "locate",
            TrackerRequest::Heartbeat => "heartbeat",
            TrackerRequest::Bye => "bye",
            TrackerRequest::Stats => "stats",
            TrackerRequest::ListPage { .. } => "list_page",
        }
    }
}

/// Where a page of [`TrackerRequest::ListPage`] ends: the last file's name and ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListCursor {
    pub name: String,
    pub id: FileId,
}

/// Most files in one [`TrackerResponse::FilePage`]: about 350 KB with the longest names,
/// far under [`crate::MAX_FRAME`].
pub const LIST_PAGE_MAX: u32 = 1000;

/// Most files in an answer to the unpaged [`TrackerRequest::List`]: about 7 MB with the
/// longest names, under [`crate::MAX_FRAME`].
pub const LIST_UNPAGED_MAX: usize = 20_000;

/// The tracker's answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrackerResponse {
    /// The session is open. `addr` is the address other peers will be told to use.
    Welcome {
        version: u32,
        addr: SocketAddr,
        heartbeat_ms: u64,
        ttl_ms: u64,
        /// This tracker answers [`TrackerRequest::ListPage`] (false from trackers before it).
        #[serde(default)]
        list_pages: bool,
    },
    /// Done.
    Ok,
    /// The file is registered (or was already, by the same content).
    Registered { file: FileSummary },
    /// Files, for `List` and `Find`.
    Files { files: Vec<FileSummary> },
    /// One page of files, for `ListPage`; `next` is where the next page starts (`None`: this
    /// was the last).
    FilePage {
        files: Vec<FileSummary>,
        #[serde(default)]
        next: Option<ListCursor>,
    },
    /// A manifest.
    Manifest { manifest: Manifest },
    /// Holders of a file.
    Holders {
        file: FileSummary,
        holders: Vec<Holder>,
    },
    /// Counters.
    Stats(TrackerStats),
    /// The request failed.
    Error(WireError),
}

/// The tracker's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackerStats {
    pub files: u64,
    pub peers: u64,
    pub holdings: u64,
    pub requests: u64,
}

// ---------------------------------------------------------------------------------------------
// Peer channel: p2pd -> p2pd, TCP. Requests may be pipelined; answers come in order.

/// Requests one daemon sends another. The first must be [`PeerRequest::Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Opens the connection. Over a secure session the peer ID is the session's and this one
    /// must match it; over a plain connection (an open swarm) it is only a claim.
    Hello {
        version: u32,
        peer_id: PeerId,
        agent: String,
    },
    /// One chunk of a file. Answered by [`PeerResponse::Chunk`] and `len` raw bytes.
    GetChunk { file_id: FileId, index: u32 },
    /// Which chunks of a file the peer holds now.
    GetHave { file_id: FileId },
    /// Which chunks of a file the peer holds now (answered by [`PeerResponse::Have`]), and
    /// from then on every chunk it gains, pushed as [`PeerResponse::Gained`] between answers.
    /// One file per connection: a second `Watch` replaces the first. Only to a peer whose
    /// welcome said `pushes`.
    Watch { file_id: FileId },
}

/// Most chunk indices in one [`PeerResponse::Gained`] (at most 40 KiB of CBOR, under
/// [`crate::MAX_PEER_FRAME`]); more go in several.
pub const MAX_GAINED: usize = 8_192;

/// A daemon's answers to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerResponse {
    /// The connection is open.
    Welcome {
        version: u32,
        peer_id: PeerId,
        /// This peer answers [`PeerRequest::Watch`] (false from peers before it).
        #[serde(default)]
        pushes: bool,
    },
    /// Chunk `index` follows as `len` raw bytes.
    Chunk { index: u32, len: u32 },
    /// The chunks held now.
    Have { chunks: Bitfield },
    /// Pushed to a watcher (see [`PeerRequest::Watch`]), never an answer: chunks of the
    /// watched file the peer has gained since it last said (at most [`MAX_GAINED`] a message).
    Gained { file_id: FileId, indices: Vec<u32> },
    /// The request failed (the connection stays open).
    Error(WireError),
}

// ---------------------------------------------------------------------------------------------
// Control channel: p2pctl -> p2pd, over the daemon's Unix socket (a named pipe on Windows).

/// Requests `p2pctl` sends its daemon. The first must be [`CtlRequest::Hello`]. One command
/// per connection; some commands answer with a stream of events ending in a final one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CtlRequest {
    /// Opens the connection.
    Hello { version: u32, agent: String },
    /// Hash and share a local file (an absolute path). Streams [`CtlResponse::Hashing`], ends
    /// with [`CtlResponse::Registered`].
    Register {
        path: String,
        #[serde(default)]
        chunk_size: Option<u32>,
    },
    /// Download a file by name, ID or unique ID prefix, into `output` (a file path or an
    /// existing directory; default: the daemon's download directory). With `follow`, streams
    /// [`CtlResponse::Chunk`] events and ends with [`CtlResponse::Completed`]; without, ends
    /// with [`CtlResponse::Started`].
    Download {
        query: String,
        #[serde(default)]
        output: Option<String>,
        follow: bool,
    },
    /// The tracker's file list.
    List,
    /// Who holds which chunks of a file.
    Locate { query: String },
    /// What this daemon shares and downloads.
    Status,
    /// Leave the network and exit.
    Quit,
    /// Pause a running download (name, ID or prefix of a local download).
    Pause { query: String },
    /// Resume a paused or failed download.
    Resume { query: String },
    /// Cancel a download and remove its partial file.
    Cancel { query: String },
    /// Stop sharing a file (the file itself is left alone).
    Unregister { query: String },
}

/// The daemon's answers to `p2pctl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CtlResponse {
    /// The connection is open.
    Welcome { version: u32, info: DaemonInfo },
    /// Progress of hashing a file for `register`.
    Hashing { done: u64, total: u64 },
    /// A file is shared; for a directory, `collection` says what the tree holds.
    Registered {
        file: FileSummary,
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        collection: Option<CollectionInfo>,
    },
    /// A download began (or was already under way); `have` chunks are already held.
    Started {
        file: FileSummary,
        output: String,
        have: u32,
    },
    /// A chunk arrived and was verified.
    Chunk {
        index: u32,
        total: u32,
        from: SocketAddr,
        have: u32,
    },
    /// A collection's download moved on: `files_done` of `files` are verified in place.
    Progress {
        files_done: u64,
        files: u64,
        bytes_done: u64,
        bytes: u64,
    },
    /// The download finished; the file is complete and verified at `output`.
    Completed {
        file: FileSummary,
        output: String,
        peers: u32,
    },
    /// Files, for `List`.
    Files { files: Vec<FileSummary> },
    /// Holders, for `Locate`.
    Located {
        file: FileSummary,
        holders: Vec<Holder>,
    },
    /// The status report.
    Status(StatusReport),
    /// Done (for `Quit`).
    Ok,
    /// A local file or download changed state (pause, resume, cancel, unregister).
    Updated { file: FileSummary },
    /// A name matched several files: choose one by ID.
    Ambiguous {
        query: String,
        candidates: Vec<FileSummary>,
    },
    /// The command failed.
    Error(WireError),
}

/// Facts about a daemon, sent in its welcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub peer_id: PeerId,
    pub listen: SocketAddr,
    pub tracker: String,
    pub download_dir: String,
    pub agent: String,
    /// The daemon's public key in hex (its fingerprint; the peer ID is derived from it).
    #[serde(default)]
    pub key: Option<String>,
    /// In a closed swarm (a swarm secret is set)?
    #[serde(default)]
    pub closed: bool,
    /// Where the daemon serves its metrics (`http://ADDR/metrics`), if it does.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

/// What a daemon shares and downloads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub info: DaemonInfo,
    /// Connected to the tracker right now?
    pub tracker_connected: bool,
    /// Why not, while opening the session keeps failing (`tracker refused us: ...`).
    #[serde(default)]
    pub tracker_problem: Option<String>,
    pub shares: Vec<ShareStatus>,
    pub downloads: Vec<DownloadStatus>,
    /// Collections (trees of files) shared or being downloaded; their files are not listed
    /// in `shares` and `downloads`.
    #[serde(default)]
    pub collections: Vec<CollectionStatus>,
}

/// What a registered directory holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionInfo {
    pub files: u64,
    pub bytes: u64,
    /// Entries not shared (symbolic links, sockets, devices), with what they are.
    #[serde(default)]
    pub skipped: Vec<String>,
}

/// One collection this daemon shares or downloads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionStatus {
    pub id: FileId,
    pub name: String,
    /// Where the tree lies (or will, once complete).
    pub path: String,
    /// `complete` once every file is verified in place (a registered tree is complete).
    pub state: DownloadState,
    pub files_done: u64,
    pub files: u64,
    pub bytes_done: u64,
    pub bytes: u64,
    /// Bytes of its files served to other peers.
    pub uploaded: u64,
    /// Why it cannot go on for now, while it cannot: a stalled file's reason (a full disk),
    /// or how many chunks no live holder has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
}

/// One file this daemon serves whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShareStatus {
    pub id: FileId,
    pub name: String,
    pub size: u64,
    pub chunks: u32,
    pub path: String,
    /// Bytes served to other peers since the daemon started.
    pub uploaded: u64,
    /// Why it is not being served, if it is not (the source changed or vanished).
    #[serde(default)]
    pub problem: Option<String>,
}

/// The state of a download, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum DownloadState {
    Running,
    Paused,
    Complete,
    Failed(String),
}

/// One download.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownloadStatus {
    pub id: FileId,
    pub name: String,
    pub size: u64,
    pub output: String,
    pub state: DownloadState,
    pub chunks: u32,
    pub have: u32,
    /// Bytes received and verified in this daemon's lifetime.
    pub downloaded: u64,
    /// Bytes received that failed verification or were duplicates.
    pub wasted: u64,
    /// Peers a chunk came from in the last few seconds.
    pub peers: u32,
    /// Bytes per second over the last few seconds.
    pub rate: u64,
    /// Chunks that no live peer holds, when the download waits for them.
    pub stalled: u32,
    /// Why the download cannot go on for now (a full disk, a write error), while it cannot;
    /// it goes on by itself once it can, or on `resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
    /// Chunks already held when this daemon run took the download up (after a restart).
    #[serde(default)]
    pub resumed_with: u32,
    /// Bytes fetched again because a crash tore them before they were made durable, over
    /// the download's whole life (persisted).
    #[serde(default)]
    pub refetched: u64,
}
