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

/// The tracker under 200 concurrent sessions, announce/locate mix, for `secs` seconds.
/// Returns the summary line.
pub fn tracker_load(dir: &Path, secs: u64) -> String {
    let tracker = Tracker::start(&dir.join("tracker-load"), "60s");
    let addr = tracker.addr;
    let sessions = 200usize;
    let files = 50usize;
    let manifests: Vec<_> = (0..files)
        .map(|i| manifest_of(&format!("f{i}"), &vec![i as u8; 1 << 20], 1024))
        .collect();
    let before = peak_rss_mib(tracker.proc.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(std::sync::Barrier::new(sessions + 1));
    let handles: Vec<_> = (0..sessions)
        .map(|i| {
            let (stop, count, ready) = (stop.clone(), count.clone(), ready.clone());
            let manifests = manifests.clone();
            std::thread::spawn(move || load_session(addr, i, &manifests, &stop, &count, &ready))
        })
        .collect();
    ready.wait();
    let registered_rss = peak_rss_mib(tracker.proc.pid());
    let start = Instant::now();
    let begin = count.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(secs));
    let done = count.load(Ordering::SeqCst) - begin;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        let _ = h.join();
    }
    let pairs = (sessions * files) as f64;
    format!(
        "tracker: {:.0} requests/s (announce/locate mix, {sessions} concurrent sessions pipelining 8, {secs} s); \
         {:.0} bytes of memory per registered peer-file pair ({} pairs, 1,024 chunks each)",
        done as f64 / elapsed,
        (registered_rss - before) * 1024.0 * 1024.0 / pairs,
        pairs
    )
}

fn load_session(
    addr: SocketAddr,
    i: usize,
    manifests: &[p2p_schema::Manifest],
    stop: &AtomicBool,
    count: &AtomicU64,
    ready: &std::sync::Barrier,
) {
    let stream = std::net::TcpStream::connect(addr).expect("tracker");
    stream.set_nodelay(true).ok();
    let mut s = p2p_tests::secure::connect_on(stream, None, None).expect("a tracker session");
    let listen: SocketAddr = format!("127.0.0.1:{}", 10000 + i).parse().unwrap();
    send(
        &mut s,
        &TrackerRequest::Hello {
            version: PROTOCOL_VERSION,
            listen,
            agent: "bench".into(),
        },
    );
    let _ = read_frame::<TrackerResponse>(&mut s);
    for m in manifests {
        send(
            &mut s,
            &TrackerRequest::Register {
                manifest: m.clone(),
            },
        );
        let _ = read_frame::<TrackerResponse>(&mut s);
    }
    ready.wait();
    let ids: Vec<_> = manifests.iter().map(|m| m.file_id()).collect();
    // Like a daemon's session, requests are pipelined (a window of 8), answered in order.
    let window = 8u64;
    let mut n = 0u64;
    let mut buf = Vec::new();
    let mut body = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        buf.clear();
        for k in 0..window {
            let file_id = ids[((n + k) as usize + i) % ids.len()];
            let request = if (n + k).is_multiple_of(2) {
                TrackerRequest::Gained {
                    file_id,
                    indices: vec![((n + k) % 1024) as u32],
                }
            } else {
                TrackerRequest::Locate {
                    file_id,
                    max: 50,
                    brief: false,
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
                Ok(true) if !check => {}
                Ok(true) => match p2p_schema::frame::decode_body::<TrackerResponse>(&body) {
                    Ok(TrackerResponse::Error(e)) => {
                        eprintln!("tracker load: the tracker refused a request: {e}");
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("tracker load: bad answer: {e}");
                        return;
                    }
                },
                _ => return,
            }
        }
        count.fetch_add(window, Ordering::Relaxed);
        n += window;
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
