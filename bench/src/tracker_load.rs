//! The tracker under load: 200 concurrent sessions, an announce/locate mix, pipelined like a
//! daemon's session; and its memory with 2,000 half-open connections.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2p_schema::frame::encode_frame;
use p2p_schema::{TrackerRequest, TrackerResponse, PROTOCOL_VERSION};
use p2p_tests::fake::{manifest_of, read_frame};
use p2p_tests::Tracker;

use crate::measure::peak_rss_mib;

fn send<T: serde::Serialize>(s: &mut impl Write, msg: &T) {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf).expect("encode");
    s.write_all(&buf).expect("send");
}

/// Peers the fleet-scale load simulates, files each holds, and files in all (so each file has
/// `PEERS * FILES_PER_PEER / FILES` holders).
const PEERS: usize = 10_000;
const FILES_PER_PEER: usize = 20;
const FILES: usize = 1_000;
/// Concurrent sessions of the request mix.
const SESSIONS: usize = 200;
/// Threads that bring the peers in.
const POPULATORS: usize = 8;

/// The tracker at fleet scale: 10,000 peers holding 20 of 1,000 files each (200,000 peer-file
/// pairs of 1,024 chunks; three in four hold the whole file, the rest half of it), brought in
/// one session per peer as daemons would; then 200 more sessions pipelining an announce/locate
/// mix for `secs` seconds. Returns the summary line: memory per pair, requests per second and
/// the size of a `Locate` answer.
pub fn tracker_load(dir: &Path, secs: u64) -> String {
    let tracker = Tracker::start(&dir.join("tracker-load"), "3600s");
    let addr = tracker.addr;
    let pid = tracker.proc.pid();
    let manifests = Arc::new(fleet_manifests());
    let ids: Arc<Vec<_>> = Arc::new(manifests.iter().map(|m| m.file_id()).collect());
    // One peer registers every file and stays (its session is dropped without a bye).
    let registrant = register_all(addr, &manifests);
    std::thread::sleep(Duration::from_millis(300));
    let registered = rss_mib(pid);
    let started = Instant::now();
    let populators: Vec<_> = (0..POPULATORS)
        .map(|t| {
            let ids = ids.clone();
            std::thread::spawn(move || {
                (t..PEERS)
                    .step_by(POPULATORS)
                    .all(|p| bring_in(addr, p, &ids))
            })
        })
        .collect();
    let complete = populators.into_iter().all(|h| h.join().unwrap_or(false));
    let populate_secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(1500)); // a write-behind batch or two
    let populated = rss_mib(pid);
    let pairs = (PEERS * FILES_PER_PEER) as f64;
    let per_pair = (populated - registered) * 1024.0 * 1024.0 / pairs;
    let (rate, locate_bytes) = request_mix(addr, &ids, secs);
    drop(registrant);
    format!(
        "tracker at fleet scale: {PEERS} peers x {FILES_PER_PEER} files ({} peer-file pairs of \
         1,024 chunks over {FILES} files, brought in by {PEERS} sessions in {populate_secs:.1} s{}): \
         {per_pair:.0} bytes of memory per pair (RSS {registered:.0} -> {populated:.0} MiB); \
         {rate:.0} requests/s (announce/locate mix, {SESSIONS} sessions pipelining 8, {secs} s); \
         a brief locate of 50 holders answers in {locate_bytes:.0} bytes",
        pairs as u64,
        if complete { "" } else { ", SOME FAILED" },
    )
}

/// The tracker's next answer; `None` if the session ended or the answer did not decode.
fn reply(s: &mut impl std::io::Read) -> Option<TrackerResponse> {
    read_frame::<TrackerResponse>(s).ok().flatten()
}

/// The files: 1,024 chunks of 1 KiB each, all different.
fn fleet_manifests() -> Vec<p2p_schema::Manifest> {
    let mut data = vec![0u8; 1 << 20];
    (0..FILES)
        .map(|i| {
            data[..8].copy_from_slice(&(i as u64).to_le_bytes());
            manifest_of(&format!("fleet-{i}"), &data, 1024)
        })
        .collect()
}

/// The files peer `p` holds: each file ends up with the same number of holders.
fn files_of(p: usize) -> impl Iterator<Item = usize> {
    let stride = FILES / FILES_PER_PEER;
    (0..FILES_PER_PEER).map(move |k| (p + k * stride) % FILES)
}

/// A greeted session as a new peer listening on `port`.
fn session(addr: SocketAddr, port: u16) -> Option<p2p_tests::secure::SecureConn> {
    let stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_nodelay(true).ok();
    let mut s = p2p_tests::secure::connect_on(stream, None, None).ok()?;
    send(
        &mut s,
        &TrackerRequest::Hello {
            version: PROTOCOL_VERSION,
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            agent: "bench".into(),
        },
    );
    match reply(&mut s) {
        Some(TrackerResponse::Welcome { .. }) => Some(s),
        other => {
            eprintln!("tracker load: hello answered with {other:?}");
            None
        }
    }
}

fn register_all(
    addr: SocketAddr,
    manifests: &[p2p_schema::Manifest],
) -> Option<p2p_tests::secure::SecureConn> {
    let mut s = session(addr, 9)?;
    for m in manifests {
        send(
            &mut s,
            &TrackerRequest::Register {
                manifest: m.clone(),
                member: false,
            },
        );
        if !matches!(reply(&mut s), Some(TrackerResponse::Registered { .. })) {
            eprintln!("tracker load: a registration failed");
            return None;
        }
    }
    Some(s)
}

/// What peer `p` holds of a file: three peers in four the whole file, the rest every other
/// chunk.
fn holding(p: usize, k: usize) -> p2p_schema::Bitfield {
    if !(p + k).is_multiple_of(4) {
        return p2p_schema::Bitfield::full(1024);
    }
    let mut bits = p2p_schema::Bitfield::new(1024);
    for i in (0..1024).step_by(2) {
        bits.set(i);
    }
    bits
}

/// Peer `p` says hello and announces what it holds, pipelined, then goes (without a bye: it
/// stays registered for the TTL, as a daemon between sessions would).
fn bring_in(addr: SocketAddr, p: usize, ids: &[p2p_schema::FileId]) -> bool {
    let Some(mut s) = session(addr, 1024 + (p % 60_000) as u16) else {
        return false;
    };
    let mut buf = Vec::new();
    for (k, f) in files_of(p).enumerate() {
        let request = TrackerRequest::Have {
            file_id: ids[f],
            chunks: holding(p, k),
        };
        encode_frame(&request, &mut buf).expect("encode");
    }
    if s.write_all(&buf).is_err() {
        return false;
    }
    (0..FILES_PER_PEER).all(|_| {
        let answer = reply(&mut s);
        let ok = matches!(answer, Some(TrackerResponse::Ok));
        if !ok {
            eprintln!("tracker load: an announcement was answered with {answer:?}");
        }
        ok
    })
}

/// `SESSIONS` more peers, each holding half of its 20 files, pipelining announcements of
/// chunks gained and brief locates of any file for `secs` seconds. Returns requests per second
/// and the mean size of a locate answer.
fn request_mix(addr: SocketAddr, ids: &Arc<Vec<p2p_schema::FileId>>, secs: u64) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let locate_bytes = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(std::sync::Barrier::new(SESSIONS + 1));
    let handles: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let (stop, count, ready) = (stop.clone(), count.clone(), ready.clone());
            let (ids, locate_bytes) = (ids.clone(), locate_bytes.clone());
            std::thread::spawn(move || {
                let tally = (&*count, &*locate_bytes);
                mix_session(addr, PEERS + i, &ids, &stop, tally, &ready)
            })
        })
        .collect();
    ready.wait();
    let start = Instant::now();
    let (begin, begin_bytes) = (
        count.load(Ordering::SeqCst),
        locate_bytes.load(Ordering::SeqCst),
    );
    std::thread::sleep(Duration::from_secs(secs));
    let done = count.load(Ordering::SeqCst) - begin;
    let bytes = locate_bytes.load(Ordering::SeqCst) - begin_bytes;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        let _ = h.join();
    }
    // Half the requests are locates.
    (
        done as f64 / elapsed,
        bytes as f64 / (done as f64 / 2.0).max(1.0),
    )
}

fn mix_session(
    addr: SocketAddr,
    p: usize,
    ids: &[p2p_schema::FileId],
    stop: &AtomicBool,
    (count, locate_bytes): (&AtomicU64, &AtomicU64),
    ready: &std::sync::Barrier,
) {
    let s = session(addr, 1024 + (p % 60_000) as u16).and_then(|mut s| {
        let mut buf = Vec::new();
        for f in files_of(p) {
            let mut chunks = p2p_schema::Bitfield::new(1024);
            (0..512).for_each(|i| {
                chunks.set(i);
            });
            let request = TrackerRequest::Have {
                file_id: ids[f],
                chunks,
            };
            encode_frame(&request, &mut buf).expect("encode");
        }
        s.write_all(&buf).ok()?;
        (0..FILES_PER_PEER)
            .all(|_| matches!(reply(&mut s), Some(TrackerResponse::Ok)))
            .then_some(s)
    });
    ready.wait();
    let Some(mut s) = s else {
        eprintln!("tracker load: a session of the mix could not start");
        return;
    };
    let own: Vec<_> = files_of(p).map(|f| ids[f]).collect();
    let mut rng = fastrand::Rng::with_seed(p as u64);
    // Like a daemon's session, requests are pipelined (a window of 8), answered in order.
    let window = 8u64;
    let mut n = 0u64;
    let mut buf = Vec::new();
    let mut body = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        buf.clear();
        for k in 0..window {
            let request = if (n + k).is_multiple_of(2) {
                TrackerRequest::Gained {
                    file_id: own[rng.usize(..own.len())],
                    indices: vec![512 + rng.u32(..512)],
                }
            } else {
                TrackerRequest::Locate {
                    file_id: ids[rng.usize(..ids.len())],
                    max: 50,
                    brief: true,
                }
            };
            encode_frame(&request, &mut buf).expect("encode");
        }
        if s.write_all(&buf).is_err() {
            return;
        }
        for k in 0..window {
            // Decoding every answer would make this load generator, which shares the cores
            // with the tracker, the bottleneck: one in 64 is decoded and checked, the rest
            // are read and skipped.
            let check = (n + k).is_multiple_of(64);
            match next_frame(&mut s, &mut body) {
                Ok(true) => {
                    if !(n + k).is_multiple_of(2) {
                        locate_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                    }
                    if check && !answer_ok(&body) {
                        return;
                    }
                }
                _ => return,
            }
        }
        count.fetch_add(window, Ordering::Relaxed);
        n += window;
    }
}

fn answer_ok(body: &[u8]) -> bool {
    match p2p_schema::frame::decode_body::<TrackerResponse>(body) {
        Ok(TrackerResponse::Error(e)) => {
            eprintln!("tracker load: the tracker refused a request: {e}");
            false
        }
        Ok(_) => true,
        Err(e) => {
            eprintln!("tracker load: bad answer: {e}");
            false
        }
    }
}

/// Reads one frame's body into `body`; false at the end of the stream.
fn next_frame(s: &mut impl std::io::Read, body: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).is_err() {
        return Ok(false);
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > p2p_schema::MAX_FRAME {
        return Err(std::io::Error::other("frame too large"));
    }
    body.resize(len, 0);
    s.read_exact(body)?;
    Ok(true)
}

/// Resident memory (VmRSS) of a live process, in MiB; NaN if it cannot be read.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// 2,000 connections that each announce a 9 MiB frame and send none of it, from 10 loopback
/// addresses (under the per-address cap): first as their first frame (before any hello),
/// then after a hello. Returns the summary line with the tracker's RSS in each case.
/// A connection kept open by the half-open measurement.
#[allow(dead_code)] // held only to be dropped
enum Held {
    Plain(std::net::TcpStream),
    Secure(Box<p2p_tests::secure::SecureConn>),
}

pub fn half_open(dir: &Path) -> String {
    const CONNECTIONS: u32 = 2000;
    let tracker = Tracker::start(&dir.join("tracker-half-open"), "60s");
    let pid = tracker.proc.pid();
    let idle = rss_mib(pid);
    let length = (p2p_schema::MAX_FRAME as u32).to_be_bytes();
    let measure = |hello: bool| {
        let mut held = Vec::new();
        for n in 0..CONNECTIONS {
            let from = std::net::Ipv4Addr::new(127, 0, 1, (n % 10 + 1) as u8);
            let Ok(mut s) = p2p_tests::connect_from(from, tracker.addr) else {
                eprintln!("half-open: connection {n} failed");
                break;
            };
            if hello {
                let Ok(mut s) = p2p_tests::secure::connect_on(s, None, None) else {
                    eprintln!("half-open: handshake {n} failed");
                    break;
                };
                send(
                    &mut s,
                    &TrackerRequest::Hello {
                        version: PROTOCOL_VERSION,
                        listen: "127.0.0.1:9".parse().expect("address"),
                        agent: "bench".into(),
                    },
                );
                let _ = read_frame::<TrackerResponse>(&mut s);
                let _ = s.write_raw(&length);
                held.push(Held::Secure(Box::new(s)));
            } else {
                let _ = s.write_all(&length);
                held.push(Held::Plain(s));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let rss = rss_mib(pid);
        drop(held);
        rss
    };
    let before_hello = measure(false);
    let after_hello = measure(true);
    format!(
        "tracker: RSS with {CONNECTIONS} half-open connections each announcing a 9 MiB frame: \
         {before_hello:.0} MiB when the frame is their first (refused at once), {after_hello:.0} MiB \
         when it follows a hello (held); {idle:.0} MiB idle, peak {:.0} MiB",
        peak_rss_mib(pid)
    )
}
