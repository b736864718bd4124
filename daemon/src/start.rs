//! Start-up and shutdown of the daemon: builds the parts, runs them, and stops them in order.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::context::Context;
use crate::control::ControlListener;
use crate::link::LinkPolicy;
use crate::metrics::Metrics;
use crate::node::{announce_all, Files, Node};
use crate::serve::Uploads;
use crate::store::Store;
use crate::tracker_client::{file_of, homes, Announce, Identity, TrackerClient, Trackers};
use crate::{Config, Error};

/// Runs the daemon until `shutdown` resolves or `p2pctl quit` asks it to stop: serves peers
/// on `peers`, commands on `control`, and keeps the tracker session. `ready` is called once
/// it serves (with a one-line status). Then leaves the network, flushes state and removes
/// the socket.
pub async fn run(
    config: Config,
    peers: TcpListener,
    control: ControlListener,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&str),
) -> Result<(), Error> {
    let (store, clean) = open_store(&config).await?;
    let links = link_policy(&config).await?;
    let peer_id = links.key.peer_id();
    let bound = peers
        .local_addr()
        .map_err(|e| Error::io("reading the bound peer address", e))?;
    let listen = config.advertise.unwrap_or(bound);
    let stop = CancellationToken::new();
    let files: Files = Arc::default();
    let metrics = Arc::new(Metrics::new());
    // The sessions wait until what we hold is loaded: their first announcement must be whole.
    let (loaded, gate) = tokio::sync::watch::channel(false);
    let (tracker, tracker_tasks) = start_trackers(
        &config,
        Identity {
            key: links.key.clone(),
            listen,
            swarm: config.swarm.clone(),
            tracker_key: None,
        },
        &files,
        (gate, metrics.clone(), stop.clone()),
    );
    let mut config = config;
    let metrics_listener = bind_metrics(&mut config).await?;
    let uploads = Arc::new(Uploads::new(&config));
    let ctx = Arc::new(Context::new(
        config,
        links,
        listen,
        store,
        tracker,
        metrics,
        stop.clone(),
    ));
    let node = Arc::new(Node::new(ctx, files));
    node.load(clean).await;
    let _ = loaded.send(true);
    let server = tokio::spawn(crate::serve::serve(
        node.clone(),
        uploads,
        peers,
        stop.clone(),
    ));
    let socket = node.config.socket.clone();
    let controller = tokio::spawn(crate::control::serve(node.clone(), control, stop.clone()));
    if let Some(listener) = metrics_listener {
        tokio::spawn(serve_metrics(node.clone(), listener, stop.clone()));
    }
    let status = format!(
        "serving peers on {bound}, control socket {}",
        socket.display()
    );
    let key = hex::encode(node.links.key.public());
    let closed = node.config.swarm.is_some();
    info!(peer_id = %peer_id.short(), %key, closed, "p2pd ready: {status}");
    ready(&status);

    tokio::select! {
        () = shutdown => {}
        () = stop.cancelled() => {}
    }
    info!("shutting down");
    let tasks = Running {
        trackers: tracker_tasks,
        server,
        controller,
    };
    shut_down(&node, tasks).await?;
    info!("stopped");
    Ok(())
}

/// Starts one session per tracker. Each re-announces only the files whose records live on
/// its tracker, once `gate` turns true (what we hold is loaded).
fn start_trackers(
    config: &Config,
    identity: Identity,
    files: &Files,
    (gate, metrics, stop): (
        tokio::sync::watch::Receiver<bool>,
        Arc<Metrics>,
        CancellationToken,
    ),
) -> (Trackers, Vec<tokio::task::JoinHandle<()>>) {
    let addresses = config.trackers.clone();
    let replicas = config.tracker_replicas;
    let mut clients = Vec::new();
    let mut tasks = Vec::new();
    for (i, address) in addresses.iter().enumerate() {
        let announce: Announce = {
            let (files, addresses) = (files.clone(), addresses.clone());
            Arc::new(move || {
                let mut all = announce_all(&files);
                all.retain(|r| {
                    file_of(r).is_none_or(|id| homes(&addresses, &id, replicas).contains(&i))
                });
                all
            })
        };
        let identity = Identity {
            tracker_key: config.tracker_keys.get(i).copied(),
            ..identity.clone()
        };
        let (client, task) = TrackerClient::start(
            address.clone(),
            identity,
            announce,
            gate.clone(),
            metrics.clone(),
            stop.clone(),
        );
        clients.push(client);
        tasks.push(task);
    }
    (Trackers::new(clients, replicas), tasks)
}

/// How links to other daemons are opened: the daemon's key pair (`identity.key` in the data
/// directory, made on first start; read off the executor), the swarm's key, `--encrypt`.
async fn link_policy(config: &Config) -> Result<LinkPolicy, Error> {
    let key_file = config.data_dir.join("identity.key");
    let path = key_file.clone();
    let (key, made) =
        tokio::task::spawn_blocking(move || p2p_service::identity::load_or_create(&path))
            .await
            .map_err(|e| Error::Other(format!("reading the identity key: {e}")))??;
    if made {
        info!(key = %key_file.display(), "made a new identity");
    }
    Ok(LinkPolicy {
        key: Arc::new(key),
        swarm: config.swarm.clone(),
        encrypt: config.encrypt,
    })
}

/// Binds `--metrics`, if set, and records the bound address in `config` (port 0 resolved).
async fn bind_metrics(config: &mut Config) -> Result<Option<TcpListener>, Error> {
    let Some(addr) = config.metrics else {
        return Ok(None);
    };
    let listener = p2p_service::metrics::bind(addr)
        .await
        .map_err(|e| Error::io("binding the metrics address", e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io("reading the bound metrics address", e))?;
    config.metrics = Some(bound);
    info!("serving metrics on http://{bound}/metrics");
    Ok(Some(listener))
}

/// Serves the metrics, with the catalog's gauges read at each scrape.
async fn serve_metrics(node: Arc<Node>, listener: TcpListener, stop: CancellationToken) {
    let weak = Arc::downgrade(&node);
    drop(node);
    let render: p2p_service::metrics::Render = Arc::new(move || {
        let Some(node) = weak.upgrade() else {
            return "# EOF\n".to_string();
        };
        let downloads = node
            .downloads()
            .iter()
            .map(|d| d.state())
            .collect::<Vec<_>>();
        node.metrics.render(downloads, node.share_count())
    });
    p2p_service::metrics::serve(listener, render, stop).await;
}

/// The daemon's long-running tasks besides its downloads.
struct Running {
    trackers: Vec<tokio::task::JoinHandle<()>>,
    server: tokio::task::JoinHandle<()>,
    controller: tokio::task::JoinHandle<()>,
}

/// Stops everything in order: tell systemd, signal every part, let the tracker session say
/// Bye (bounded: a dead tracker cannot hold us up), stop accepting peers and commands, let
/// downloads commit what they wrote, then flush and mark the state clean.
async fn shut_down(node: &Node, tasks: Running) -> Result<(), Error> {
    p2p_service::lifecycle::notify_stopping();
    node.request_stop();
    let byes = async {
        for t in tasks.trackers {
            let _ = t.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), byes).await;
    let _ = tasks.server.await;
    let _ = tasks.controller.await;
    for dl in node.downloads() {
        let _ = tokio::time::timeout(Duration::from_secs(5), dl.join()).await;
    }
    node.store.flush().await?;
    node.store.mark_clean().await?;
    Ok(())
}

/// Opens the state database (off the executor: it may wait for the lock), and says whether
/// the previous run stopped cleanly.
async fn open_store(config: &Config) -> Result<(Store, bool), Error> {
    let dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await
        .map_err(|e| Error::Other(format!("opening the state database: {e}")))??;
    let clean = store.take_clean_flag().await?;
    if !clean {
        info!("the previous run did not stop cleanly: unrecorded chunks will be re-verified");
    }
    Ok((store, clean))
}
