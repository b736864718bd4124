//! `--metrics ADDR`: a program's metrics in the Prometheus text format, at
//! `http://ADDR/metrics`, for Prometheus (or `curl`) to scrape.
//!
//! The server is deliberately small: one `GET` per connection, a request head of at most
//! [`MAX_HEAD`] bytes read within [`HEAD_TIMEOUT`], the answer, then the connection closes.
//! Connections are capped in all and per address like every other server here. It serves
//! nothing but the metrics, but those name the files a daemon shares: bind it to loopback or
//! a management network.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use prometheus_client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::caps::ConnectionCaps;

/// Renders the metrics as text, at each scrape (it may refresh gauges first).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Longest request head read.
pub const MAX_HEAD: usize = 8 << 10;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The content type of the text `prometheus-client` writes (OpenMetrics).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` for [`serve`]; the error says what could not be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {addr}: {e}"),
        )
    })
}

/// Serves `render`'s text on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, render: Render, stop: CancellationToken) {
    let caps = ConnectionCaps::new(64, 8);
    while let Some((stream, remote, slot)) =
        crate::accept::next_admitted("metrics", &listener, &caps, &stop).await
    {
        let render = render.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &render).await {
                debug!(%remote, "metrics request: {e}");
            }
            drop(slot);
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time"))??;
    let (status, body) = route(&head, render);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        if status.starts_with("200") {
            CONTENT_TYPE
        } else {
            "text/plain; charset=utf-8"
        },
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    if !head.starts_with("HEAD ") {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// The status line and body for a request head.
fn route(head: &str, render: &Render) -> (&'static str, String) {
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", render()),
        ("GET" | "HEAD", _) => ("404 Not Found", "try /metrics\n".into()),
        _ => ("405 Method Not Allowed", "GET /metrics only\n".into()),
    }
}

/// Reads until the blank line that ends a request head, at most [`MAX_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Encodes `registry` in the text format (an encoding error, which only a broken custom
/// metric could cause, leaves a comment saying so).
pub fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        text = format!("# encoding the metrics failed: {e}\n# EOF\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may close (and reset) a connection whose head is too long.
        let _ = s.write_all(request).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let render: Render = Arc::new(|| "x_total 1\n# EOF\n".to_string());
        let server = tokio::spawn(serve(listener, render, stop.clone()));

        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx_total 1\n# EOF\n"), "{ok}");
        let missing = get(addr, b"GET / HTTP/1.0\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        // A head that never ends is cut off at the limit, without an answer.
        let long = get(addr, &vec![b'a'; MAX_HEAD + 2048]).await;
        assert!(long.is_empty(), "{long}");

        stop.cancel();
        server.await.unwrap();
    }
}
