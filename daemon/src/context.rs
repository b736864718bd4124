//! [`Context`]: what every part of the daemon shares: its settings, identity, state
//! database, tracker session and stop signal. It uses only the link policy (a plain value),
//! so every part can use it.

use std::net::SocketAddr;

use p2p_schema::PeerId;
use tokio_util::sync::CancellationToken;

use crate::link::LinkPolicy;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::tracker_client::Trackers;
use crate::Config;

pub struct Context {
    pub config: Config,
    /// Derived from the key of `links`: no one else can speak for it.
    pub peer_id: PeerId,
    /// How links to other daemons are opened: our key, the swarm's, encryption.
    pub links: LinkPolicy,
    /// The address other peers reach us at.
    pub listen: SocketAddr,
    pub store: Store,
    /// The tracker sessions (one per tracker; each file's requests go to its own).
    pub tracker: Trackers,
    pub metrics: std::sync::Arc<Metrics>,
    /// Cancelled when the daemon stops; every task's token is a child of it.
    stop: CancellationToken,
}

impl Context {
    pub fn new(
        config: Config,
        links: LinkPolicy,
        listen: SocketAddr,
        store: Store,
        tracker: Trackers,
        metrics: std::sync::Arc<Metrics>,
        stop: CancellationToken,
    ) -> Context {
        Context {
            config,
            peer_id: links.key.peer_id(),
            links,
            listen,
            store,
            tracker,
            metrics,
            stop,
        }
    }

    /// The daemon's stop token: cancelled when it stops. Parts that stop on their own too
    /// (a download) take a child of it.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Starts an orderly shutdown (what `p2pctl quit` and signals do).
    pub fn request_stop(&self) {
        self.stop.cancel();
    }
}
