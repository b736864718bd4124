//! The daemon's metrics, served in the Prometheus text format with `--metrics ADDR` (see
//! `p2p_service::metrics`; the names are listed in the README). Counters count from the
//! daemon's start; gauges that describe the catalog are refreshed at each scrape.

use p2p_schema::{DownloadState, FileId};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A file, by its full ID in hex.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabel {
    pub file: String,
}

/// Which way: connections we accepted or opened, pushes we sent or took in.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Peers fetching from us; pushes we sent.
    In,
    /// Peers we fetch from; pushes we received.
    Out,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Direction::In => "in",
            Direction::Out => "out",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Every metric the daemon keeps.
pub struct Metrics {
    registry: Registry,
    sent: Family<FileLabel, Counter>,
    received: Family<FileLabel, Counter>,
    verified: Counter,
    rejected: Counter,
    connections: Family<DirectionLabel, Gauge>,
    pushes: Family<DirectionLabel, Counter>,
    downloads: Family<StateLabel, Gauge>,
    shares: Gauge,
    tracker_requests: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            sent: Family::default(),
            received: Family::default(),
            verified: Counter::default(),
            rejected: Counter::default(),
            connections: Family::default(),
            pushes: Family::default(),
            downloads: Family::default(),
            shares: Gauge::default(),
            tracker_requests: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "p2pd_sent_bytes",
            "Chunk bytes sent to other peers, per file",
            m.sent.clone(),
        );
        registry.register(
            "p2pd_received_bytes",
            "Chunk bytes received and verified, per file (duplicates and bad chunks not counted)",
            m.received.clone(),
        );
        registry.register(
            "p2pd_chunks_verified",
            "Chunks received that matched their SHA-256",
            m.verified.clone(),
        );
        registry.register(
            "p2pd_chunks_rejected",
            "Chunks received that did not match their SHA-256 (discarded)",
            m.rejected.clone(),
        );
        registry.register(
            "p2pd_peer_connections",
            "Peer connections open now: in, peers fetching from us; out, peers we fetch from",
            m.connections.clone(),
        );
        registry.register(
            "p2pd_have_pushes",
            "Pushes of chunks gained: in, sent to peers watching our files; out, received from peers we watch",
            m.pushes.clone(),
        );
        registry.register(
            "p2pd_downloads",
            "Downloads by state (running, paused, complete, failed)",
            m.downloads.clone(),
        );
        registry.register("p2pd_shares", "Files shared whole", m.shares.clone());
        registry.register(
            "p2pd_tracker_requests",
            "Requests sent to the tracker, by kind",
            m.tracker_requests.clone(),
        );
        Metrics { registry, ..m }
    }

    /// `n` bytes of a chunk of `file` went to a peer.
    pub fn sent(&self, file: &FileId, n: u64) {
        self.sent.get_or_create(&label(file)).inc_by(n);
    }

    /// A verified chunk of `n` bytes of `file` arrived.
    pub fn verified(&self, file: &FileId, n: u64) {
        self.received.get_or_create(&label(file)).inc_by(n);
        self.verified.inc();
    }

    /// A chunk failed verification.
    pub fn rejected(&self) {
        self.rejected.inc();
    }

    /// Counts a peer connection while the guard lives.
    pub fn connection(&self, direction: Direction) -> Connection {
        let gauge = self
            .connections
            .get_or_create(&DirectionLabel { direction })
            .clone();
        gauge.inc();
        Connection(gauge)
    }

    /// A push of chunks gained was sent (`in`) or received (`out`).
    pub fn pushed(&self, direction: Direction) {
        self.pushes
            .get_or_create(&DirectionLabel { direction })
            .inc();
    }

    /// A request of `kind` went to the tracker.
    pub fn tracker_request(&self, kind: &'static str) {
        self.tracker_requests
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// The metrics as text, with the catalog's gauges set from `downloads` (each one's
    /// state) and `shares`.
    pub fn render(
        &self,
        downloads: impl IntoIterator<Item = DownloadState>,
        shares: usize,
    ) -> String {
        let mut counts = [0i64; 4];
        for state in downloads {
            counts[state_index(&state)] += 1;
        }
        for (i, name) in STATES.iter().enumerate() {
            self.downloads
                .get_or_create(&StateLabel { state: name })
                .set(counts[i]);
        }
        self.shares.set(shares as i64);
        p2p_service::metrics::encode(&self.registry)
    }
}

/// Decrements its gauge when dropped (see [`Metrics::connection`]).
pub struct Connection(Gauge);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

const STATES: [&str; 4] = ["running", "paused", "complete", "failed"];

fn state_index(state: &DownloadState) -> usize {
    match state {
        DownloadState::Running => 0,
        DownloadState::Paused => 1,
        DownloadState::Complete => 2,
        DownloadState::Failed(_) => 3,
    }
}

fn label(file: &FileId) -> FileLabel {
    FileLabel {
        file: file.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges_by_their_names() {
        let m = Metrics::new();
        let id = FileId([7; 32]);
        m.sent(&id, 100);
        m.verified(&id, 40);
        m.rejected();
        let conn = m.connection(Direction::Out);
        m.pushed(Direction::In);
        m.tracker_request("locate");
        let text = m.render([DownloadState::Running, DownloadState::Complete], 3);
        let file = id.to_string();
        for line in [
            format!("p2pd_sent_bytes_total{{file=\"{file}\"}} 100"),
            format!("p2pd_received_bytes_total{{file=\"{file}\"}} 40"),
            "p2pd_chunks_verified_total 1".to_string(),
            "p2pd_chunks_rejected_total 1".to_string(),
            "p2pd_peer_connections{direction=\"out\"} 1".to_string(),
            "p2pd_have_pushes_total{direction=\"in\"} 1".to_string(),
            "p2pd_downloads{state=\"running\"} 1".to_string(),
            "p2pd_downloads{state=\"paused\"} 0".to_string(),
            "p2pd_shares 3".to_string(),
            "p2pd_tracker_requests_total{kind=\"locate\"} 1".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        drop(conn);
        let text = m.render([], 0);
        assert!(
            text.contains("p2pd_peer_connections{direction=\"out\"} 0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
