//! A recording TCP proxy on loopback: forwards every connection to one target and keeps a
//! copy of all bytes that pass, both ways, so a test can search what went over the wire.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// At most this much is recorded (later bytes are forwarded, not kept).
const MAX_RECORDED: usize = 512 << 20;

pub struct RecordingProxy {
    pub addr: SocketAddr,
    recorded: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl RecordingProxy {
    /// A proxy on a free loopback port to `target`.
    pub fn start(target: SocketAddr) -> RecordingProxy {
        Self::start_on("127.0.0.1:0", target)
    }

    /// A proxy listening on `listen`, to `target`.
    pub fn start_on(listen: &str, target: SocketAddr) -> RecordingProxy {
        let listener = TcpListener::bind(listen).expect("proxy listener");
        let addr = listener.local_addr().expect("proxy address");
        let recorded: Arc<Mutex<Vec<u8>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (rec, halt) = (recorded.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(inbound) = conn else { continue };
                let Ok(outbound) = TcpStream::connect(target) else {
                    continue;
                };
                for (from, to) in [
                    (inbound.try_clone(), outbound.try_clone()),
                    (outbound.try_clone(), inbound.try_clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let rec = rec.clone();
                    std::thread::spawn(move || pump(from, to, &rec));
                }
            }
        });
        RecordingProxy {
            addr,
            recorded,
            stop,
        }
    }

    /// Everything that passed so far, both ways, in arrival order per direction.
    pub fn recorded(&self) -> Vec<u8> {
        self.recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, recorded: &Mutex<Vec<u8>>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut rec = recorded.lock().unwrap_or_else(|p| p.into_inner());
            if rec.len() + n <= MAX_RECORDED {
                rec.extend_from_slice(&buf[..n]);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Does `needle` occur in `haystack`?
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
