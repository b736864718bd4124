//! The tracker's metrics, served in the Prometheus text format with `--metrics ADDR` (see
//! `p2p_service::metrics`; the names are listed in the README).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Every metric the tracker keeps.
pub struct Metrics {
    registry: Registry,
    requests: Family<KindLabel, Counter>,
    latency: Family<KindLabel, Histogram>,
    sessions: Gauge,
    refused: Counter,
    files: Gauge,
    peers: Gauge,
    holdings: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        // 10 µs to about 10 s: a request is answered from memory, a registration is flushed.
        let latency = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1e-5, 4.0, 11))
        });
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            latency,
            sessions: Gauge::default(),
            refused: Counter::default(),
            files: Gauge::default(),
            peers: Gauge::default(),
            holdings: Gauge::default(),
        };
        registry.register(
            "p2p_tracker_requests",
            "Requests answered, by kind",
            m.requests.clone(),
        );
        registry.register(
            "p2p_tracker_request_seconds",
            "Time to answer a request, by kind",
            m.latency.clone(),
        );
        registry.register(
            "p2p_tracker_sessions",
            "Daemon sessions open now (past the handshake)",
            m.sessions.clone(),
        );
        registry.register(
            "p2p_tracker_handshakes_refused",
            "Sessions refused at the handshake (wrong or missing swarm secret, earlier versions, garbage)",
            m.refused.clone(),
        );
        registry.register("p2p_tracker_files", "Files registered", m.files.clone());
        registry.register("p2p_tracker_peers", "Peers live now", m.peers.clone());
        registry.register(
            "p2p_tracker_holdings",
            "Peer-file pairs: a peer holding some of a file",
            m.holdings.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A request of `kind` was answered in `took`.
    pub fn answered(&self, kind: &'static str, took: Duration) {
        let label = KindLabel { kind };
        self.requests.get_or_create(&label).inc();
        self.latency
            .get_or_create(&label)
            .observe(took.as_secs_f64());
    }

    /// A handshake was refused.
    pub fn refused(&self) {
        self.refused.inc();
    }

    /// Counts an open session while the guard lives.
    pub fn session(&self) -> Session {
        self.sessions.inc();
        Session(self.sessions.clone())
    }

    /// The metrics as text, with the registry's gauges set from `stats`.
    pub fn render(&self, stats: &p2p_schema::TrackerStats) -> String {
        self.files.set(stats.files as i64);
        self.peers.set(stats.peers as i64);
        self.holdings.set(stats.holdings as i64);
        p2p_service::metrics::encode(&self.registry)
    }
}

/// Decrements the session gauge when dropped.
pub struct Session(Gauge);

impl Drop for Session {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_requests_latency_sessions_and_the_registry() {
        let m = Metrics::new();
        m.answered("locate", Duration::from_micros(30));
        m.answered("locate", Duration::from_micros(30));
        m.refused();
        let session = m.session();
        let stats = p2p_schema::TrackerStats {
            files: 2,
            peers: 3,
            holdings: 5,
            requests: 2,
        };
        let text = m.render(&stats);
        for line in [
            "p2p_tracker_requests_total{kind=\"locate\"} 2",
            "p2p_tracker_request_seconds_count{kind=\"locate\"} 2",
            "p2p_tracker_sessions 1",
            "p2p_tracker_handshakes_refused_total 1",
            "p2p_tracker_files 2",
            "p2p_tracker_peers 3",
            "p2p_tracker_holdings 5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        drop(session);
        assert!(m.render(&stats).contains("p2p_tracker_sessions 0\n"));
    }
}
