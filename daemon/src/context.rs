//! [`Context`]: what every part of the daemon shares: its settings, identity, state
//! database, tracker session and stop signal. It uses no other part of the daemon, so every
//! part can use it.

use std::net::SocketAddr;

use p2p_schema::PeerId;
use tokio::sync::watch;

use crate::store::Store;
use crate::tracker_client::TrackerClient;
use crate::Config;

pub struct Context {
    pub config: Config,
    pub peer_id: PeerId,
    /// The address other peers reach us at.
    pub listen: SocketAddr,
    pub store: Store,
    pub tracker: TrackerClient,
    stop: watch::Sender<bool>,
}

impl Context {
    pub fn new(
        config: Config,
        peer_id: PeerId,
        listen: SocketAddr,
        store: Store,
        tracker: TrackerClient,
        stop: watch::Sender<bool>,
    ) -> Context {
        Context {
            config,
            peer_id,
            listen,
            store,
            tracker,
            stop,
        }
    }

    /// A receiver that turns true when the daemon is stopping.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Starts an orderly shutdown (what `p2pctl quit` and signals do).
    pub fn request_stop(&self) {
        let _ = self.stop.send(true);
    }
}
