//! The control socket: where `p2pctl` talks to its daemon.
//!
//! Lifecycle: the socket's directory must be private (not writable by others); a lock file
//! beside the socket keeps a second daemon away; a socket left by a crash is removed only if
//! nothing answers on it; the socket is created owner-only (0600) and removed on exit.
//!
//! One command per connection: a hello, the command, then one or more responses (the last
//! one final).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use interprocess::local_socket::tokio::{prelude::*, Listener, Stream};
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use p2p_schema::{
    CtlRequest, CtlResponse, DownloadState, ErrorCode, FrameReader, FrameWriter, WireError,
    MAX_FRAME, PROTOCOL_VERSION,
};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::download::{Download, Event};
use crate::node::{Node, Resolve, TreeEvent, TreeProgress};
use crate::Error;

/// A bound control socket, with the lock that makes it ours.
pub struct ControlListener {
    listener: Listener,
    _lock: File,
}

/// Creates the control socket at `path`, following the lifecycle above.
pub fn bind(path: &Path) -> Result<ControlListener, Error> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    private_dir(dir)?;
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("opening lock file {lock_path:?}"), e))?;
    if let Err(e) = lock.try_lock() {
        return Err(Error::Other(format!(
            "another p2pd is already using the socket {} ({e})",
            path.display()
        )));
    }
    remove_stale(path)?;
    let name = path
        .to_fs_name::<GenericFilePath>()
        .map_err(|e| Error::io(format!("socket path {}", path.display()), e))?;
    let options = ListenerOptions::new().name(name);
    #[cfg(unix)]
    let options = {
        use interprocess::os::unix::local_socket::ListenerOptionsExt;
        options.mode(0o600)
    };
    let listener = options
        .create_tokio()
        .map_err(|e| Error::io(format!("creating control socket {}", path.display()), e))?;
    Ok(ControlListener {
        listener,
        _lock: lock,
    })
}

/// Makes sure `dir` exists and only its owner can write to it.
fn private_dir(dir: &Path) -> Result<(), Error> {
    p2p_service::lifecycle::create_private_dir(dir).map_err(Error::Other)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir)
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        if meta.mode() & 0o022 != 0 {
            return Err(Error::Other(format!(
                "the socket directory {} is writable by other users; use a private directory (mode 0700)",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Removes a socket file nobody answers on (left by a crash).
fn remove_stale(path: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        if std::fs::symlink_metadata(path).is_ok() {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(Error::Other(format!(
                        "a daemon is already listening on {}",
                        path.display()
                    )))
                }
                Err(_) => {
                    info!(socket = %path.display(), "removing a stale socket");
                    std::fs::remove_file(path)
                        .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
                }
            }
        }
    }
    // A named pipe vanishes with its last handle: nothing is left behind to remove.
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

type Reader = FrameReader<ReadHalf<Stream>>;
type Writer = FrameWriter<WriteHalf<Stream>>;

/// Accepts `p2pctl` connections until `stop` becomes true; the socket is removed on return.
pub async fn serve(node: Arc<Node>, control: ControlListener, stop: CancellationToken) {
    while let Some(stream) =
        p2p_service::accept::next("control", &stop, || control.listener.accept()).await
    {
        let node = node.clone();
        tokio::spawn(async move {
            let (r, w) = tokio::io::split(stream);
            let mut reader = FrameReader::new(r, MAX_FRAME);
            let mut writer = FrameWriter::new(w);
            if let Err(e) = connection(&node, &mut reader, &mut writer).await {
                debug!("control connection ended: {e}");
            }
        });
    }
    // Dropping the listener removes the socket file.
    drop(control);
}

async fn connection(
    node: &Arc<Node>,
    reader: &mut Reader,
    writer: &mut Writer,
) -> Result<(), String> {
    let fail = |code, msg: &str| CtlResponse::Error(WireError::new(code, msg));
    if !hello(node, reader, writer).await? {
        return Ok(());
    }
    let Some(request) = reader
        .recv::<CtlRequest>()
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    debug!(?request, "command");
    match request {
        CtlRequest::Hello { .. } => {
            send(writer, fail(ErrorCode::BadRequest, "already said hello")).await
        }
        CtlRequest::Register { path, chunk_size } => {
            register(node, writer, &path, chunk_size).await
        }
        CtlRequest::Download {
            query,
            output,
            follow,
        } => download(node, writer, &query, output.as_deref(), follow).await,
        CtlRequest::List => send(writer, list(node).await).await,
        CtlRequest::Locate { query } => send(writer, locate(node, query).await).await,
        CtlRequest::Status => send(writer, CtlResponse::Status(node.status())).await,
        CtlRequest::Pause { query } => updated(writer, node.pause(&query).await).await,
        CtlRequest::Resume { query } => updated(writer, node.resume(&query).await).await,
        CtlRequest::Cancel { query } => updated(writer, node.cancel(&query).await).await,
        CtlRequest::Unregister { query } => updated(writer, node.unregister(&query).await).await,
        CtlRequest::Quit => {
            info!("quit requested");
            let r = send(writer, CtlResponse::Ok).await;
            node.request_stop();
            r
        }
    }
}

/// Takes `p2pctl`'s hello. Returns false if it left before saying anything.
async fn hello(node: &Node, reader: &mut Reader, writer: &mut Writer) -> Result<bool, String> {
    let fail = |code, msg: &str| CtlResponse::Error(WireError::new(code, msg));
    match reader
        .recv::<CtlRequest>()
        .await
        .map_err(|e| e.to_string())?
    {
        Some(CtlRequest::Hello { version, .. }) if version == PROTOCOL_VERSION => {
            let welcome = CtlResponse::Welcome {
                version: PROTOCOL_VERSION,
                info: node.info(),
            };
            writer.send(&welcome).await.map_err(|e| e.to_string())?;
        }
        Some(CtlRequest::Hello { version, .. }) => {
            let msg = format!(
                "p2pctl speaks protocol {version}, this daemon {PROTOCOL_VERSION}: use matching versions"
            );
            let _ = writer
                .send(&fail(ErrorCode::UnsupportedVersion, &msg))
                .await;
            return Err(msg);
        }
        Some(_) => {
            let _ = writer
                .send(&fail(
                    ErrorCode::BadRequest,
                    "the first message must be a hello",
                ))
                .await;
            return Err("no hello".into());
        }
        None => return Ok(false),
    }
    Ok(true)
}

/// The files the tracker lists.
async fn list(node: &Node) -> CtlResponse {
    match node.tracker.list().await {
        Ok(files) => CtlResponse::Files { files },
        Err(e) => CtlResponse::Error(e),
    }
}

/// The holders of the file `query` names, sorted by address.
async fn locate(node: &Node, query: String) -> CtlResponse {
    let file = match node.resolve(&query).await {
        Ok(file) => file,
        Err(r) => return resolve_failure(query, r),
    };
    match node.tracker.locate(file.id, 1000, false).await {
        Ok((file, mut holders)) => {
            holders.sort_by_key(|h| h.addr);
            CtlResponse::Located { file, holders }
        }
        Err(e) => CtlResponse::Error(e),
    }
}

async fn updated(
    writer: &mut Writer,
    result: Result<p2p_schema::FileSummary, WireError>,
) -> Result<(), String> {
    let reply = match result {
        Ok(file) => CtlResponse::Updated { file },
        Err(e) => CtlResponse::Error(e),
    };
    send(writer, reply).await
}

async fn send(writer: &mut Writer, reply: CtlResponse) -> Result<(), String> {
    writer.send(&reply).await.map_err(|e| e.to_string())
}

fn resolve_failure(query: String, r: Resolve) -> CtlResponse {
    match r {
        Resolve::Ambiguous(candidates) => CtlResponse::Ambiguous { query, candidates },
        Resolve::Error(e) => CtlResponse::Error(e),
    }
}

async fn register(
    node: &Arc<Node>,
    writer: &mut Writer,
    path: &str,
    chunk_size: Option<u32>,
) -> Result<(), String> {
    let (tx, mut rx) = mpsc::channel(8);
    let work = node.register(path, chunk_size, tx);
    tokio::pin!(work);
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            Some((done, total)) = rx.recv() => {
                // Progress is best effort: a vanished p2pctl does not stop the registration.
                let _ = writer.send(&CtlResponse::Hashing { done, total }).await;
            }
        }
    };
    let reply = match result {
        Ok((file, collection)) => CtlResponse::Registered {
            file,
            path: path.to_string(),
            collection,
        },
        Err(e) => CtlResponse::Error(e),
    };
    writer.send(&reply).await.map_err(|e| e.to_string())
}

async fn download(
    node: &Arc<Node>,
    writer: &mut Writer,
    query: &str,
    output: Option<&str>,
    follow: bool,
) -> Result<(), String> {
    let file = match node.resolve(query).await {
        Ok(f) => f,
        Err(r) => {
            return writer
                .send(&resolve_failure(query.to_string(), r))
                .await
                .map_err(|e| e.to_string())
        }
    };
    if file.collection {
        return download_tree(node, writer, &file, output, follow).await;
    }
    let dl = match node.start_download(&file, output).await {
        Ok(dl) => dl,
        Err(e) => {
            return writer
                .send(&CtlResponse::Error(e))
                .await
                .map_err(|e| e.to_string())
        }
    };
    // Subscribe before looking at the state, so no event is missed in between.
    let events = dl.events.subscribe();
    let started = CtlResponse::Started {
        file: file.clone(),
        output: dl.output.display().to_string(),
        have: dl.local.have_count(),
    };
    writer.send(&started).await.map_err(|e| e.to_string())?;
    if !follow {
        return Ok(());
    }
    follow_download(writer, &dl, &file, events).await
}

/// `download` of a collection: starts it, then follows it if asked.
async fn download_tree(
    node: &Arc<Node>,
    writer: &mut Writer,
    file: &p2p_schema::FileSummary,
    output: Option<&str>,
    follow: bool,
) -> Result<(), String> {
    let tree = match node.start_tree(file, output).await {
        Ok(tree) => tree,
        Err(e) => return send(writer, CtlResponse::Error(e)).await,
    };
    let mut events = tree.events.subscribe();
    let started = CtlResponse::Started {
        file: file.clone(),
        output: tree.output.display().to_string(),
        have: 0,
    };
    writer.send(&started).await.map_err(|e| e.to_string())?;
    if !follow {
        return Ok(());
    }
    let completed = CtlResponse::Completed {
        file: file.clone(),
        output: tree.output.display().to_string(),
        peers: 0,
    };
    let progress = |p: TreeProgress| CtlResponse::Progress {
        files_done: p.files_done,
        files: p.files,
        bytes_done: p.bytes_done,
        bytes: p.bytes,
    };
    let failed = |why: String| {
        CtlResponse::Error(WireError::new(
            ErrorCode::Io,
            format!("download of {}/: {why}", file.name),
        ))
    };
    match tree.state() {
        DownloadState::Complete => return send(writer, completed).await,
        DownloadState::Failed(why) => return send(writer, failed(why)).await,
        _ => {}
    }
    send(writer, progress(tree.progress())).await?;
    loop {
        match events.recv().await {
            Ok(TreeEvent::Progress(p)) => send(writer, progress(p)).await?,
            Ok(TreeEvent::Completed) => return send(writer, completed).await,
            Ok(TreeEvent::Failed(why)) => return send(writer, failed(why)).await,
            Ok(TreeEvent::Stalled(why)) => {
                // The download waits in the daemon; the command says why and ends.
                let e = WireError::new(
                    ErrorCode::Io,
                    format!("download of {}/ stalled: {why}", file.name),
                );
                return send(writer, CtlResponse::Error(e)).await;
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => {
                let e = WireError::new(ErrorCode::Internal, "the download ended unexpectedly");
                return send(writer, CtlResponse::Error(e)).await;
            }
        }
    }
}

/// Passes a download's progress to `p2pctl` until it completes, fails, stalls, or is
/// paused or cancelled.
async fn follow_download(
    writer: &mut Writer,
    dl: &Download,
    file: &p2p_schema::FileSummary,
    mut events: broadcast::Receiver<Event>,
) -> Result<(), String> {
    let total = dl.manifest.chunk_count();
    let completed = |peers| CtlResponse::Completed {
        file: file.clone(),
        output: dl.output.display().to_string(),
        peers,
    };
    match dl.state() {
        p2p_schema::DownloadState::Complete => {
            return writer.send(&completed(0)).await.map_err(|e| e.to_string())
        }
        p2p_schema::DownloadState::Failed(why) => {
            let e = WireError::new(ErrorCode::Io, format!("download failed: {why}"));
            return writer
                .send(&CtlResponse::Error(e))
                .await
                .map_err(|e| e.to_string());
        }
        _ => {}
    }
    let stalled = |why: String| {
        CtlResponse::Error(WireError::new(
            ErrorCode::Io,
            format!("download of {} stalled: {why}", file.name),
        ))
    };
    if let Some(why) = dl.blocked() {
        return writer.send(&stalled(why)).await.map_err(|e| e.to_string());
    }
    loop {
        let reply = match events.recv().await {
            Ok(Event::Chunk { index, from, have }) => CtlResponse::Chunk {
                index,
                total,
                from,
                have,
            },
            Ok(Event::Completed { peers }) => {
                return writer
                    .send(&completed(peers))
                    .await
                    .map_err(|e| e.to_string())
            }
            Ok(Event::Stalled(why)) => {
                // The download waits in the daemon; the command says why and ends.
                return writer.send(&stalled(why)).await.map_err(|e| e.to_string());
            }
            Ok(Event::Failed(why)) => {
                let e = WireError::new(ErrorCode::Io, format!("download of {}: {why}", file.name));
                return writer
                    .send(&CtlResponse::Error(e))
                    .await
                    .map_err(|e| e.to_string());
            }
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => {
                let e = WireError::new(ErrorCode::Internal, "the download ended unexpectedly");
                return writer
                    .send(&CtlResponse::Error(e))
                    .await
                    .map_err(|e| e.to_string());
            }
        };
        // If p2pctl went away (Ctrl-C), the download carries on in the daemon.
        writer.send(&reply).await.map_err(|e| e.to_string())?;
    }
}
