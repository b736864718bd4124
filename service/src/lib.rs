//! Process plumbing shared by `p2p-tracker`, `p2pd` and `p2pctl`: everything about running as
//! a program on a machine, nothing about the wire (that is `p2p-schema`).
//!
//! # Layout
//! - [`paths`]: default data and configuration directories, the control socket, the secret
//!   file.
//! - [`units`]: durations as flags take them, byte counts as output shows them.
//! - `accept` (feature `accept`): the accept loop of the three servers.
//! - `identity` (feature `identity`): the key pair on disk.
//! - [`caps`]: how many connections a server holds, in all and per address.
//! - `lifecycle` (feature `lifecycle`): settings merged from flags, file and defaults;
//!   logging; readiness for systemd or a `--daemon` parent; detaching; the runtime; the
//!   shutdown signal (SIGINT/SIGTERM; Ctrl-C elsewhere); the exit code.
//! - `store` (feature `store`): opening a sled database by the rule both servers follow.
//! - `metrics` (feature `metrics`): `--metrics ADDR`, the Prometheus text format over HTTP.
//!
//! Platform code lives here: systemd notification and `--daemon` exist on Unix only (they are
//! a no-op and a clear refusal elsewhere), so the programs build for Windows too.

#[cfg(feature = "accept")]
pub mod accept;
pub mod caps;
#[cfg(feature = "identity")]
pub mod identity;
#[cfg(feature = "lifecycle")]
pub mod lifecycle;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod paths;
mod secret;
#[cfg(feature = "store")]
pub mod store;
pub mod units;

pub use paths::{
    absolute, config_file_for, data_dir_for, default_data_dir, default_socket_candidates,
    read_secret, runtime_dir, socket_in,
};
pub use secret::Secret;
pub use units::{parse_duration, HumanBytes};
