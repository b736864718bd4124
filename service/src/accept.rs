//! Accepting connections, the one loop shape of the tracker, the peer server and the control
//! socket: wait for the next connection or the stop signal; on a failed accept (out of file
//! descriptors, say) log it and back off instead of spinning; over a [`ConnectionCaps`] cap,
//! close the connection at once.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::caps::{ConnectionCaps, Slot};

/// The pause after a failed accept.
const BACK_OFF: Duration = Duration::from_millis(100);

/// The next connection `accept` yields, or `None` once `stop` is cancelled. `what` names the
/// kind of connection in the log line of a failed accept.
pub async fn next<T, F>(
    what: &str,
    stop: &CancellationToken,
    mut accept: impl FnMut() -> F,
) -> Option<T>
where
    F: Future<Output = io::Result<T>>,
{
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return None,
            a = accept() => a,
        };
        match accepted {
            Ok(conn) => return Some(conn),
            Err(e) => {
                warn!(error = %e, "accepting a {what} connection failed");
                tokio::time::sleep(BACK_OFF).await;
            }
        }
    }
}

/// The next TCP connection both caps admit, with its slot under them (given back when
/// dropped) and `TCP_NODELAY` set, or `None` once `stop` is cancelled. Refused connections
/// are logged and closed.
pub async fn next_admitted(
    what: &str,
    listener: &TcpListener,
    caps: &ConnectionCaps,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr, Slot)> {
    loop {
        let (stream, remote) = next(what, stop, || listener.accept()).await?;
        match caps.admit(remote.ip()) {
            Ok(slot) => {
                let _ = stream.set_nodelay(true);
                return Some((stream, remote, slot));
            }
            // Dropping the stream closes it.
            Err(why) => warn!(%remote, "refusing a {what} connection: {why}"),
        }
    }
}

/// At most one log line per period for one kind of event (refused handshakes, say), so
/// that a flood of them cannot flood the log.
pub struct Throttle {
    every: Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttle {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` if a line may be logged now (`n` lines were left out since the last one),
    /// `None` if this one is to be left out.
    pub fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                let skipped = state.1;
                *state = (Some(now), 0);
                Some(skipped)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        let t = Throttle::new(Duration::ZERO);
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), Some(0));
    }

    use super::*;

    #[tokio::test]
    async fn a_failed_accept_is_retried_and_stop_ends_the_wait() {
        let stop = CancellationToken::new();
        let mut calls = 0;
        let got = next("test", &stop, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(io::Error::other("out of descriptors"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got, Some(3));
        stop.cancel();
        let never = next("test", &stop, std::future::pending::<io::Result<()>>).await;
        assert_eq!(never, None);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let caps = ConnectionCaps::new(1, 1);
        let stop = CancellationToken::new();
        let _first = TcpStream::connect(addr).await.expect("connect");
        let (_s, _r, slot) = next_admitted("test", &listener, &caps, &stop)
            .await
            .expect("first admitted");
        let mut second = TcpStream::connect(addr).await.expect("connect");
        let waiting = next_admitted("test", &listener, &caps, &stop);
        let refused = async {
            use tokio::io::AsyncReadExt;
            let mut b = [0u8; 1];
            // The refused connection is closed: end of stream, or reset.
            matches!(second.read(&mut b).await, Ok(0) | Err(_))
        };
        tokio::select! {
            _ = waiting => panic!("a connection over the cap was admitted"),
            closed = refused => assert!(closed),
        }
        drop(slot);
        assert_eq!(caps.held(), 0);
    }
}
