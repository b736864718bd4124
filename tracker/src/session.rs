//! One daemon's session: the hello, then requests answered in order until the daemon says
//! `Bye`, goes silent, sends something invalid, or the tracker shuts down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use p2p_schema::secure::{self, HandshakeError, Keypair, SecureRead, SecureWrite};
use p2p_schema::{
    ErrorCode, FrameError, FrameReader, FrameWriter, PeerId, TrackerRequest, TrackerResponse,
    WireError, LIST_PAGE_MAX, LIST_UNPAGED_MAX, MAX_FRAME, MAX_HELLO_FRAME, PROTOCOL_VERSION,
};
use p2p_service::accept::Throttle;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{Config, Registry};

/// How long a new connection may take to say hello (its whole first frame).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

type Reader = FrameReader<SecureRead<OwnedReadHalf>>;
type Writer = FrameWriter<SecureWrite<OwnedWriteHalf>>;

/// What every session shares.
pub struct Shared {
    pub registry: Arc<Registry>,
    pub config: Arc<Config>,
    /// The tracker's own key pair.
    pub key: Arc<Keypair>,
    /// Refused handshakes are logged at most once a second.
    pub refusals: Arc<Throttle>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Serves one connection until it ends. Never panics on peer input; errors end only this
/// session.
pub async fn serve(
    mut stream: TcpStream,
    remote: SocketAddr,
    shared: Shared,
    stop: CancellationToken,
) {
    let swarm = shared.config.swarm.as_ref();
    let secured = tokio::time::timeout(
        HELLO_TIMEOUT,
        secure::accept(&mut stream, &shared.key, swarm),
    )
    .await;
    let session = match secured {
        Ok(Ok(session)) => session,
        Ok(Err(HandshakeError::EarlierVersion { first })) => {
            shared.metrics.refused();
            return answer_earlier_version(stream, first).await;
        }
        Ok(Err(e)) => {
            shared.metrics.refused();
            if let Some(skipped) = shared.refusals.allow() {
                warn!(%remote, skipped, "refused a session: {e}");
            }
            return;
        }
        Err(_) => {
            debug!("no handshake in time");
            return;
        }
    };
    let peer = session.remote_peer_id();
    let (r, w) = stream.into_split();
    let (r, w) = session.into_stream(r, w);
    // Until the hello is accepted only a tiny frame is read (see `MAX_HELLO_FRAME`).
    let mut reader = FrameReader::new(r, MAX_HELLO_FRAME);
    let mut writer = FrameWriter::new(w);
    let (registry, config) = (&shared.registry, &shared.config);
    if greet(&mut reader, &mut writer, (peer, remote), registry, config).await {
        reader.set_max(MAX_FRAME);
        let _open = shared.metrics.session();
        let shared = (registry.as_ref(), config.as_ref(), shared.metrics.as_ref());
        answer(reader, writer, peer, shared, stop).await;
    }
}

/// A daemon of an earlier version opened with a plain hello: tell it, in its own framing,
/// to upgrade.
async fn answer_earlier_version(stream: TcpStream, first: [u8; 4]) {
    let (r, w) = stream.into_split();
    let mut reader = FrameReader::new((&first[..]).chain(r), MAX_HELLO_FRAME);
    let mut writer = FrameWriter::new(w);
    if let Ok(Ok(Some(_))) =
        tokio::time::timeout(HELLO_TIMEOUT, reader.recv::<ciborium::Value>()).await
    {
        debug!("a daemon of an earlier protocol version said hello");
        let e = WireError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "this tracker speaks protocol version {PROTOCOL_VERSION} (authenticated, \
                 encrypted sessions): upgrade p2pd"
            ),
        );
        let _ = writer.send(&TrackerResponse::Error(e)).await;
    }
}

/// The first frame: a hello (answered with a welcome: true), or a `Stats` request from
/// monitoring, answered without joining. False ends the session.
async fn greet(
    reader: &mut Reader,
    writer: &mut Writer,
    (peer, remote): (PeerId, SocketAddr),
    registry: &Registry,
    config: &Config,
) -> bool {
    match tokio::time::timeout(HELLO_TIMEOUT, reader.recv::<TrackerRequest>()).await {
        // Monitoring (`p2p-tracker stats`) may ask for counters without joining.
        Ok(Ok(Some(TrackerRequest::Stats))) => {
            let _ = writer.send(&TrackerResponse::Stats(registry.stats())).await;
            false
        }
        Ok(Ok(Some(hello))) => match handshake(hello, peer, remote, registry, config) {
            Ok(welcome) => writer.send(&welcome).await.is_ok(),
            Err(e) => {
                debug!(error = %e, "hello refused");
                let _ = writer.send(&TrackerResponse::Error(e)).await;
                false
            }
        },
        Ok(Ok(None)) => false,
        Ok(Err(e)) => {
            refuse(writer, &e).await;
            false
        }
        Err(_) => {
            debug!("no hello in time");
            false
        }
    }
}

/// Answers a greeted peer's requests, in order, until it says `Bye`, goes silent for the TTL,
/// sends something invalid, or the tracker stops.
async fn answer(
    mut reader: Reader,
    mut writer: Writer,
    peer: PeerId,
    (registry, config, metrics): (&Registry, &Config, &crate::metrics::Metrics),
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
        let (kind, started) = (request.kind(), std::time::Instant::now());
        let (response, changed) = handle(request, peer, registry, config);
        if changed {
            // Registrations are rare and worth keeping: make them durable before confirming.
            if let Err(e) = registry.flush().await {
                warn!(error = %e, "flushing a registration");
            }
        }
        metrics.answered(kind, started.elapsed());
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
    peer_id: PeerId,
    remote: SocketAddr,
    registry: &Registry,
    config: &Config,
) -> Result<TrackerResponse, WireError> {
    let TrackerRequest::Hello {
        version, listen, ..
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
    if listen.port() == 0 {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            "listen port 0: announce the port actually bound",
        ));
    }
    let addr = recorded_address(listen, remote, config);
    let (new, peers) = registry.hello(peer_id, addr);
    if new {
        info!("{addr} has connected. {peers} peers on network.");
    } else {
        info!("{addr} has reconnected. {peers} peers on network.");
    }
    let ttl = config.ttl;
    Ok(TrackerResponse::Welcome {
        version: PROTOCOL_VERSION,
        addr,
        heartbeat_ms: (ttl / 3).as_millis() as u64,
        ttl_ms: ttl.as_millis() as u64,
        list_pages: true,
    })
}

/// Where other peers are sent to reach this one: the IP its session comes from, with the
/// announced port. An announced IP is taken only from a closed swarm's members, or where the
/// tracker is told to trust it (`--trust-advertised`): otherwise anyone could point
/// downloaders at a third party's host.
fn recorded_address(listen: SocketAddr, remote: SocketAddr, config: &Config) -> SocketAddr {
    let trusted = config.swarm.is_some() || config.trust_advertised;
    if trusted && !listen.ip().is_unspecified() {
        listen
    } else {
        SocketAddr::new(remote.ip(), listen.port())
    }
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
        TrackerRequest::Register { manifest, member } => {
            let name = manifest.name.clone();
            registry.register(peer, manifest, member).map(|(file, new)| {
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
        TrackerRequest::Locate {
            file_id,
            max,
            brief,
        } => registry
            .locate(&file_id, None, max.min(config.max_holders) as usize, brief)
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
