//! One daemon's session: the hello, then requests answered in order until the daemon says
//! `Bye`, goes silent, sends something invalid, or the tracker shuts down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;

use p2p_schema::{
    ErrorCode, FrameError, FrameReader, FrameWriter, PeerId, TrackerRequest, TrackerResponse,
    WireError, LIST_PAGE_MAX, LIST_UNPAGED_MAX, MAX_FRAME, MAX_HELLO_FRAME, PROTOCOL_VERSION,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{Config, Registry};

/// How long a new connection may take to say hello (its whole first frame).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

type Reader = FrameReader<tokio::net::tcp::OwnedReadHalf>;
type Writer = FrameWriter<tokio::net::tcp::OwnedWriteHalf>;

/// Serves one connection until it ends. Never panics on peer input; errors end only this
/// session.
pub async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    registry: Arc<Registry>,
    config: Arc<Config>,
    stop: CancellationToken,
) {
    let (r, w) = stream.into_split();
    // Until the hello is accepted only a tiny frame is read (see `MAX_HELLO_FRAME`).
    let mut reader = FrameReader::new(r, MAX_HELLO_FRAME);
    let mut writer = FrameWriter::new(w);
    if let Some(peer) = greet(&mut reader, &mut writer, remote, &registry, &config).await {
        reader.set_max(MAX_FRAME);
        answer(reader, writer, peer, &registry, &config, stop).await;
    }
}

/// The first frame: a hello (answered with a welcome; the peer it names is returned), or a
/// `Stats` request from monitoring, answered without joining. `None` ends the session.
async fn greet(
    reader: &mut Reader,
    writer: &mut Writer,
    remote: SocketAddr,
    registry: &Registry,
    config: &Config,
) -> Option<PeerId> {
    match tokio::time::timeout(HELLO_TIMEOUT, reader.recv::<TrackerRequest>()).await {
        // Monitoring (`p2p-tracker stats`) may ask for counters without joining.
        Ok(Ok(Some(TrackerRequest::Stats))) => {
            let _ = writer.send(&TrackerResponse::Stats(registry.stats())).await;
            None
        }
        Ok(Ok(Some(hello))) => match handshake(hello, remote, registry, config) {
            Ok((peer, welcome)) => writer.send(&welcome).await.ok().map(|()| peer),
            Err(e) => {
                debug!(error = %e, "handshake refused");
                let _ = writer.send(&TrackerResponse::Error(e)).await;
                None
            }
        },
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            refuse(writer, &e).await;
            None
        }
        Err(_) => {
            debug!("no hello in time");
            None
        }
    }
}

/// Answers a greeted peer's requests, in order, until it says `Bye`, goes silent for the TTL,
/// sends something invalid, or the tracker stops.
async fn answer(
    mut reader: Reader,
    mut writer: Writer,
    peer: PeerId,
    registry: &Registry,
    config: &Config,
    stop: CancellationToken,
) {
    // A daemon heartbeats several times per TTL; silence for a whole TTL ends the session
    // (the registry drops the peer on its own schedule).
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = tokio::time::timeout(config.ttl, reader.recv::<TrackerRequest>()) => next,
        };
        let request = match next {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => {
                debug!("session closed");
                return;
            }
            Ok(Err(e)) => {
                if !e.is_disconnect() {
                    refuse(&mut writer, &e).await;
                }
                return;
            }
            Err(_) => {
                debug!("session silent for the TTL; closing");
                return;
            }
        };
        registry.count_request();
        let bye = matches!(request, TrackerRequest::Bye);
        if !registry.touch(&peer) && !bye {
            // Expired while connected (a stalled daemon): tell it to start over.
            let e = WireError::new(ErrorCode::NotFound, "session expired: say hello again");
            let _ = writer.send(&TrackerResponse::Error(e)).await;
            return;
        }
        let (response, changed) = handle(request, peer, registry, config);
        if changed {
            // Registrations are rare and worth keeping: make them durable before confirming.
            if let Err(e) = registry.flush().await {
                warn!(error = %e, "flushing a registration");
            }
        }
        // Pipelined requests already buffered get their answers in one write.
        if writer.feed(&response).await.is_err() {
            return;
        }
        if (bye || !reader.has_buffered()) && writer.flush().await.is_err() {
            return;
        }
        if bye {
            return;
        }
    }
}

/// Tells the other side why its input was refused, best effort.
async fn refuse(writer: &mut Writer, e: &FrameError) {
    warn!(error = %e, "invalid frame; closing session");
    let reply = TrackerResponse::Error(WireError::new(ErrorCode::BadRequest, e.to_string()));
    let _ = writer.send(&reply).await;
}

fn handshake(
    hello: TrackerRequest,
    remote: SocketAddr,
    registry: &Registry,
    config: &Config,
) -> Result<(PeerId, TrackerResponse), WireError> {
    let TrackerRequest::Hello {
        version,
        peer_id,
        listen,
        secret,
        ..
    } = hello
    else {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            "the first message must be a hello",
        ));
    };
    if version != PROTOCOL_VERSION {
        return Err(WireError::new(
            ErrorCode::UnsupportedVersion,
            format!("protocol version {version} is not supported (this tracker speaks {PROTOCOL_VERSION})"),
        ));
    }
    if let Some(expected) = &config.secret {
        let given = secret.as_deref().unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return Err(WireError::new(
                ErrorCode::Unauthorized,
                "this tracker requires a shared secret, and the one given is wrong or missing",
            ));
        }
    }
    if listen.port() == 0 {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            "listen port 0: announce the port actually bound",
        ));
    }
    // "0.0.0.0:port" means "where you see me connecting from, on that port".
    let addr = if listen.ip().is_unspecified() {
        SocketAddr::new(remote.ip(), listen.port())
    } else {
        listen
    };
    let (new, peers) = registry.hello(peer_id, addr);
    if new {
        info!("{addr} has connected. {peers} peers on network.");
    } else {
        info!("{addr} has reconnected. {peers} peers on network.");
    }
    let ttl = config.ttl;
    Ok((
        peer_id,
        TrackerResponse::Welcome {
            version: PROTOCOL_VERSION,
            addr,
            heartbeat_ms: (ttl / 3).as_millis() as u64,
            ttl_ms: ttl.as_millis() as u64,
            list_pages: true,
        },
    ))
}

/// Answers one request. Also says whether it registered something new (worth a flush).
fn handle(
    request: TrackerRequest,
    peer: PeerId,
    registry: &Registry,
    config: &Config,
) -> (TrackerResponse, bool) {
    let mut changed = false;
    let result = match request {
        TrackerRequest::Hello { .. } => {
            Err(WireError::new(ErrorCode::BadRequest, "already said hello"))
        }
        TrackerRequest::Register { manifest } => {
            let name = manifest.name.clone();
            registry.register(peer, manifest).map(|(file, new)| {
                if new {
                    info!(file = %file.id.short(), name = %name, size = file.size, "file registered");
                    changed = true;
                } else {
                    debug!(file = %file.id.short(), name = %name, "another holder registered");
                }
                TrackerResponse::Registered { file }
            })
        }
        TrackerRequest::Have { file_id, chunks } => registry
            .have(peer, file_id, chunks)
            .map(|()| TrackerResponse::Ok),
        TrackerRequest::Gained { file_id, indices } => registry
            .gained(peer, file_id, &indices)
            .map(|()| TrackerResponse::Ok),
        TrackerRequest::Drop { file_id } => {
            registry.drop_file(peer, file_id);
            Ok(TrackerResponse::Ok)
        }
        TrackerRequest::List => {
            // Daemons from before paging: as many as fit a frame.
            let mut files = registry.list();
            if files.len() > LIST_UNPAGED_MAX {
                warn!(
                    files = files.len(),
                    "an unpaged list answered with the first {LIST_UNPAGED_MAX} files only"
                );
                files.truncate(LIST_UNPAGED_MAX);
            }
            Ok(TrackerResponse::Files { files })
        }
        TrackerRequest::ListPage { after, limit } => {
            let limit = limit.clamp(1, LIST_PAGE_MAX) as usize;
            let (files, next) = registry.list_page(after.as_ref(), limit);
            Ok(TrackerResponse::FilePage { files, next })
        }
        TrackerRequest::Find { query } => Ok(TrackerResponse::Files {
            files: registry.find(&query),
        }),
        TrackerRequest::GetManifest { file_id } => {
            registry
                .manifest(&file_id)
                .map(|m| TrackerResponse::Manifest {
                    manifest: (*m).clone(),
                })
        }
        TrackerRequest::Locate { file_id, max } => registry
            .locate(&file_id, None, max.min(config.max_holders) as usize)
            .map(|(file, holders)| TrackerResponse::Holders { file, holders }),
        TrackerRequest::Heartbeat => Ok(TrackerResponse::Ok),
        TrackerRequest::Bye => {
            if let Some((addr, left)) = registry.remove_peer(&peer) {
                info!("{addr} has disconnected. {left} peers on network.");
            }
            Ok(TrackerResponse::Ok)
        }
        TrackerRequest::Stats => Ok(TrackerResponse::Stats(registry.stats())),
    };
    (result.unwrap_or_else(TrackerResponse::Error), changed)
}
