//! Misbehaving peers for the hostile-network tests, written with the `schema` crate: they
//! join the tracker like a real daemon, register a real file, and then serve it badly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use p2p_schema::frame::{decode_body, encode_frame};
use p2p_schema::secure::Keypair;
use p2p_schema::{
    FrameError, Manifest, ManifestBuilder, PeerId, PeerRequest, PeerResponse, TrackerRequest,
    TrackerResponse, PROTOCOL_VERSION,
};

/// How a fake peer misbehaves when asked for a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Sends the chunk with some bytes flipped.
    Corrupt,
    /// Accepts requests and never answers them.
    Silent,
    /// Sends the header, then the bytes one at a time, slowly.
    Drip,
    /// Refuses every chunk it announced ("not held here").
    Refuse,
    /// Answers with a header one byte short of the chunk, then those bytes.
    WrongLength,
    /// Sends the chunk as it is (for a file whose contents, not transfer, are hostile).
    Honest,
}

/// A running fake peer. Stops (closes its listener and tracker session) when dropped.
pub struct FakePeer {
    pub addr: SocketAddr,
    pub peer_id: PeerId,
    /// Chunk requests it received.
    pub requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

fn send<T: serde::Serialize>(s: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf).map_err(std::io::Error::other)?;
    s.write_all(&buf)
}

/// Reads one frame (blocking); `None` at a clean end of stream.
pub fn read_frame<T: serde::de::DeserializeOwned>(s: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > p2p_schema::MAX_FRAME {
        return Err(std::io::Error::other("frame too large"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    decode_body(&body)
        .map(Some)
        .map_err(|e: FrameError| std::io::Error::other(e.to_string()))
}

/// The manifest of `data` as the daemon would make it.
pub fn manifest_of(name: &str, data: &[u8], chunk_size: u32) -> Manifest {
    let mut b = ManifestBuilder::new(chunk_size);
    b.update(data);
    b.finish(name.to_string())
}

/// Starts a fake peer holding `file` (split into `chunk_size` chunks) and announces it to
/// the tracker at `tracker`.
pub fn start(tracker: SocketAddr, file: &Path, chunk_size: u32, behaviour: Behaviour) -> FakePeer {
    let data = std::fs::read(file).expect("reading the fake peer's file");
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let manifest = manifest_of(&name, &data, chunk_size);
    start_with(tracker, manifest, data, behaviour)
}

/// Starts a fake peer holding `data`, whose manifest is `manifest` (a collection's index,
/// say), and announces it to the tracker at `tracker`.
pub fn start_with(
    tracker: SocketAddr,
    manifest: Manifest,
    data: Vec<u8>,
    behaviour: Behaviour,
) -> FakePeer {
    let data = Arc::new(data);
    let listener = TcpListener::bind("127.0.0.1:0").expect("fake peer listener");
    let addr = listener.local_addr().unwrap();
    let key = Keypair::generate().expect("a key");
    let peer_id = key.peer_id();
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));

    // The tracker session: hello, register, then heartbeats until stopped.
    let mut session =
        crate::secure::connect(tracker, Some(&key), None).expect("fake peer reaching the tracker");
    send(
        &mut session,
        &TrackerRequest::Hello {
            version: PROTOCOL_VERSION,
            listen: addr,
            agent: "fake-peer".into(),
        },
    )
    .unwrap();
    assert!(matches!(
        read_frame::<TrackerResponse>(&mut session).unwrap(),
        Some(TrackerResponse::Welcome { .. })
    ));
    send(
        &mut session,
        &TrackerRequest::Register {
            manifest: manifest.clone(),
            member: false,
        },
    )
    .unwrap();
    match read_frame::<TrackerResponse>(&mut session).unwrap() {
        Some(TrackerResponse::Registered { .. }) => {}
        other => panic!("fake peer could not register: {other:?}"),
    }
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if send(&mut session, &TrackerRequest::Heartbeat).is_err()
                    || read_frame::<TrackerResponse>(&mut session).is_err()
                {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = send(&mut session, &TrackerRequest::Bye);
        });
    }

    {
        let (stop, requests) = (stop.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (data, manifest, stop, requests) = (
                    data.clone(),
                    manifest.clone(),
                    stop.clone(),
                    requests.clone(),
                );
                std::thread::spawn(move || {
                    let _ = serve(conn, &data, &manifest, behaviour, peer_id, &stop, &requests);
                });
            }
        });
    }
    FakePeer {
        addr,
        peer_id,
        requests,
        stop,
    }
}

fn serve(
    mut conn: TcpStream,
    data: &[u8],
    manifest: &Manifest,
    behaviour: Behaviour,
    peer_id: PeerId,
    stop: &AtomicBool,
    requests: &AtomicU64,
) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    while let Some(request) = read_frame::<PeerRequest>(&mut conn)? {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        match request {
            PeerRequest::Hello { .. } => send(
                &mut conn,
                &PeerResponse::Welcome {
                    version: PROTOCOL_VERSION,
                    peer_id,
                    // A peer from before pushes: downloaders poll it.
                    pushes: false,
                },
            )?,
            PeerRequest::GetHave { .. } | PeerRequest::Watch { .. } => send(
                &mut conn,
                &PeerResponse::Have {
                    chunks: p2p_schema::Bitfield::full(manifest.chunk_count()),
                },
            )?,
            PeerRequest::GetChunk { index, .. } => {
                requests.fetch_add(1, Ordering::SeqCst);
                let Some((offset, len)) = manifest.chunk_range(index) else {
                    continue;
                };
                let mut chunk = data[offset as usize..offset as usize + len as usize].to_vec();
                match behaviour {
                    Behaviour::Honest => {
                        send(&mut conn, &PeerResponse::Chunk { index, len })?;
                        conn.write_all(&chunk)?;
                    }
                    Behaviour::Silent => continue,
                    Behaviour::Refuse => send(
                        &mut conn,
                        &PeerResponse::Error(p2p_schema::WireError::new(
                            p2p_schema::ErrorCode::NotFound,
                            format!("chunk {index} is not held here"),
                        )),
                    )?,
                    Behaviour::WrongLength => {
                        let short = len.saturating_sub(1);
                        send(&mut conn, &PeerResponse::Chunk { index, len: short })?;
                        conn.write_all(&chunk[..short as usize])?;
                    }
                    Behaviour::Corrupt => {
                        for b in chunk.iter_mut().step_by(97) {
                            *b = !*b;
                        }
                        send(&mut conn, &PeerResponse::Chunk { index, len })?;
                        conn.write_all(&chunk)?;
                    }
                    Behaviour::Drip => {
                        send(&mut conn, &PeerResponse::Chunk { index, len })?;
                        for b in chunk {
                            if stop.load(Ordering::SeqCst) {
                                return Ok(());
                            }
                            conn.write_all(&[b])?;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// How a fake tracker lies about a file's manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lie {
    /// A name that would escape the download directory (the ID does not cover names).
    EscapingName,
    /// Different chunk hashes than the file ID was made from.
    SwappedHashes,
    /// An honest manifest, but `Locate` answered with a holder whose bitfield claims far more
    /// chunks than its bytes hold.
    MalformedHolders,
}

/// `TrackerResponse::Holders` as a hostile tracker writes it: the bitfield unchecked.
#[derive(serde::Serialize)]
enum RawResponse {
    Holders {
        file: p2p_schema::FileSummary,
        holders: Vec<RawHolder>,
    },
}

#[derive(serde::Serialize)]
struct RawHolder {
    peer_id: PeerId,
    addr: SocketAddr,
    chunks: RawBitfield,
}

#[derive(serde::Serialize)]
struct RawBitfield {
    len: u32,
    #[serde(with = "serde_bytes")]
    bits: Vec<u8>,
}

/// A tracker that answers just enough for a download to be attempted, and lies.
pub struct FakeTracker {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for FakeTracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Starts a fake tracker offering `manifest` (under its true ID), with `lie` applied.
pub fn start_tracker(manifest: Manifest, lie: Lie) -> FakeTracker {
    let listener = TcpListener::bind("127.0.0.1:0").expect("fake tracker listener");
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let id = manifest.file_id();
    let mut served = manifest.clone();
    match lie {
        Lie::EscapingName => served.name = "../../escaped.bin".into(),
        Lie::SwappedHashes => served.hashes = served.hashes.iter().map(|b| b ^ 0x55).collect(),
        Lie::MalformedHolders => {}
    }
    let summary = p2p_schema::FileSummary {
        collection: false,
        id,
        name: manifest.name.clone(),
        size: manifest.size,
        chunk_size: manifest.chunk_size,
        chunks: manifest.chunk_count(),
        seeders: 1,
        holders: 1,
    };
    let stop2 = stop.clone();
    let key = Keypair::generate().expect("a key");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop2.load(Ordering::SeqCst) {
                return;
            }
            let Ok(conn) = conn else { continue };
            let (served, summary, key) = (served.clone(), summary.clone(), key.clone());
            std::thread::spawn(move || {
                let Ok(mut conn) = crate::secure::accept(conn, &key, None) else {
                    return;
                };
                while let Ok(Some(request)) = read_frame::<TrackerRequest>(&mut conn) {
                    if lie == Lie::MalformedHolders
                        && matches!(request, TrackerRequest::Locate { .. })
                    {
                        let reply = RawResponse::Holders {
                            file: summary.clone(),
                            holders: vec![RawHolder {
                                peer_id: PeerId([7; 16]),
                                addr: SocketAddr::from(([127, 0, 0, 1], 9)),
                                chunks: RawBitfield {
                                    len: 1_000_000,
                                    bits: vec![0xff],
                                },
                            }],
                        };
                        if send(&mut conn, &reply).is_err() {
                            return;
                        }
                        continue;
                    }
                    let reply = match request {
                        TrackerRequest::Hello { listen, .. } => TrackerResponse::Welcome {
                            version: PROTOCOL_VERSION,
                            addr: listen,
                            heartbeat_ms: 1000,
                            ttl_ms: 3000,
                            list_pages: false,
                        },
                        TrackerRequest::Find { .. } | TrackerRequest::List => {
                            TrackerResponse::Files {
                                files: vec![summary.clone()],
                            }
                        }
                        TrackerRequest::GetManifest { .. } => TrackerResponse::Manifest {
                            manifest: served.clone(),
                        },
                        _ => TrackerResponse::Ok,
                    };
                    if send(&mut conn, &reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    FakeTracker { addr, stop }
}
