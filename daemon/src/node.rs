//! [`Node`]: the daemon's shared state (files it can serve, downloads, the tracker session,
//! the database) and the operations commands call. [`run`] brings it up and down.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use p2p_schema::{
    Bitfield, DaemonInfo, DownloadState, ErrorCode, FileId, FileSummary, Manifest, PeerId,
    ShareStatus, StatusReport, TrackerRequest, TrackerResponse, WireError,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{info, warn};

use crate::control::ControlListener;
use crate::download::{self, Download};
use crate::local::LocalFile;
use crate::lock;
use crate::part::{create_part, open_part, part_error};
use crate::register::{hash_file, share_name};
use crate::serve::RateLimit;
use crate::store::{DownloadRecord, ShareRecord, Store};
use crate::tracker_client::{Announce, Identity, TrackerClient};
use crate::{Config, Error};

type Files = Arc<RwLock<HashMap<FileId, Arc<LocalFile>>>>;

/// Everything a running daemon shares between its tasks.
pub struct Node {
    pub config: Config,
    pub peer_id: PeerId,
    /// The address other peers reach us at.
    pub listen: SocketAddr,
    pub store: Store,
    pub tracker: TrackerClient,
    files: Files,
    downloads: Mutex<HashMap<FileId, Arc<Download>>>,
    /// One gate per file a `download` command is starting: a second command for the same
    /// file waits for the first, then finds its download (check-and-insert is atomic).
    starting: Mutex<HashMap<FileId, Arc<tokio::sync::Mutex<()>>>>,
    stop: watch::Sender<bool>,
    /// Bounds chunk reads in progress for uploads (memory).
    pub upload_slots: Semaphore,
    /// Bounds upload bandwidth, if configured.
    pub upload_limit: RateLimit,
    /// Peers connected to our peer server now, with their connection counts.
    pub fetching: Mutex<HashMap<PeerId, u32>>,
    /// Bumped each time the last of them goes (see `LocalFile::may_send`).
    pub fetch_epoch: std::sync::atomic::AtomicU64,
}

fn err(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError::new(code, message)
}

impl Node {
    /// A receiver that turns true when the daemon is stopping.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Starts an orderly shutdown (what `p2pctl quit` and signals do).
    pub fn request_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// The file with ID `id`, if this daemon holds any of it.
    pub fn local_file(&self, id: &FileId) -> Option<Arc<LocalFile>> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn insert_file(&self, local: Arc<LocalFile>) {
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(local.id, local);
    }

    fn download(&self, id: &FileId) -> Option<Arc<Download>> {
        self.downloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Facts for `p2pctl`.
    pub fn info(&self) -> DaemonInfo {
        DaemonInfo {
            peer_id: self.peer_id,
            listen: self.listen,
            tracker: self.tracker.address().to_string(),
            download_dir: self.config.download_dir.display().to_string(),
            agent: p2p_schema::agent("p2pd"),
        }
    }

    /// Hashes the file at `path` and shares it. Hashing progress goes to `progress`.
    pub async fn register(
        &self,
        path: &str,
        chunk_size: Option<u32>,
        progress: mpsc::Sender<(u64, u64)>,
    ) -> Result<FileSummary, WireError> {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(err(
                ErrorCode::BadRequest,
                format!("{}: the daemon needs an absolute path", path.display()),
            ));
        }
        let name = share_name(&path)?;
        let hashed = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                hash_file(&path, name, chunk_size, |done, total| {
                    let _ = progress.try_send((done, total));
                })
            })
            .await
            .map_err(|e| err(ErrorCode::Internal, e.to_string()))??
        };
        let manifest = hashed.manifest;
        let id = manifest.file_id();
        let path_str = path
            .to_str()
            .ok_or_else(|| err(ErrorCode::BadRequest, "the path is not valid UTF-8"))?
            .to_string();
        let record = ShareRecord::new(manifest.clone(), path_str, hashed.identity);
        self.store
            .put_share(&id, &record)
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        self.store
            .flush()
            .await
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        let chunks = manifest.chunk_count();
        let manifest = Arc::new(manifest);
        let existing_ok = self
            .local_file(&id)
            .is_some_and(|f| f.is_complete() && f.problem().is_none());
        if !existing_ok {
            let local = LocalFile::new(
                manifest.clone(),
                hashed.file,
                path.clone(),
                Bitfield::full(chunks),
            );
            local.set_source(hashed.identity);
            self.insert_file(Arc::new(local));
        }
        info!(file = %id.short(), path = %path.display(), size = manifest.size, "file shared");
        match self
            .tracker
            .call(TrackerRequest::Register {
                manifest: (*manifest).clone(),
            })
            .await
        {
            Ok(TrackerResponse::Registered { file }) => Ok(file),
            Ok(other) => Err(err(
                ErrorCode::Internal,
                format!("unexpected tracker answer {other:?}"),
            )),
            Err(e) if e.code == ErrorCode::TrackerUnavailable => Err(err(
                e.code,
                format!(
                    "{} is shared here but not yet announced: {}; it will be announced when the tracker is back",
                    manifest.name, e.message
                ),
            )),
            Err(e) => Err(e),
        }
    }

    /// Resolves a name, ID or unique ID prefix to one file on the network.
    pub async fn resolve(&self, query: &str) -> Result<FileSummary, Resolve> {
        let files = match self
            .tracker
            .call(TrackerRequest::Find {
                query: query.to_string(),
            })
            .await
        {
            Ok(TrackerResponse::Files { files }) => files,
            Ok(other) => {
                return Err(Resolve::Error(err(
                    ErrorCode::Internal,
                    format!("unexpected tracker answer {other:?}"),
                )))
            }
            Err(e) => return Err(Resolve::Error(e)),
        };
        match <[FileSummary; 1]>::try_from(files) {
            Ok([file]) => Ok(file),
            Err(files) if files.is_empty() => Err(Resolve::Error(err(
                ErrorCode::NotFound,
                format!(
                    "no file named {query:?} (nor with that ID) on the network; see 'p2pctl list'"
                ),
            ))),
            Err(files) => Err(Resolve::Ambiguous(files)),
        }
    }

    /// Starts downloading `file` (or returns the download already under way).
    pub async fn start_download(
        self: &Arc<Self>,
        file: &FileSummary,
        output: Option<&str>,
    ) -> Result<Arc<Download>, WireError> {
        let id = file.id;
        let gate = lock(&self.starting).entry(id).or_default().clone();
        let started = {
            let _only = gate.lock().await;
            self.start_download_alone(file, output).await
        };
        let mut starting = lock(&self.starting);
        // Ours and the map's: nobody else is waiting at this gate.
        if Arc::strong_count(&gate) <= 2 {
            starting.remove(&id);
        }
        started
    }

    /// [`Node::start_download`], with no other start of the same file under way.
    async fn start_download_alone(
        self: &Arc<Self>,
        file: &FileSummary,
        output: Option<&str>,
    ) -> Result<Arc<Download>, WireError> {
        let id = file.id;
        if let Some(dl) = self.download(&id) {
            match dl.state() {
                DownloadState::Running => return Ok(dl),
                DownloadState::Paused | DownloadState::Failed(_) => {
                    dl.start(self).await;
                    return Ok(dl);
                }
                DownloadState::Complete => {}
            }
        }
        if let Some(local) = self.local_file(&id) {
            if local.is_complete() && local.problem().is_none() {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!(
                        "this daemon already has {} (ID {}) at {}",
                        file.name,
                        id.short(),
                        local.path().display()
                    ),
                ));
            }
        }
        let manifest = match self
            .tracker
            .call(TrackerRequest::GetManifest { file_id: id })
            .await?
        {
            TrackerResponse::Manifest { manifest } => manifest,
            other => {
                return Err(err(
                    ErrorCode::Internal,
                    format!("unexpected tracker answer {other:?}"),
                ))
            }
        };
        // The tracker cannot substitute hashes: the manifest must hash to the ID we asked for.
        manifest.verify(&id).map_err(|e| {
            err(
                ErrorCode::BadRequest,
                format!("the tracker sent a bad manifest: {e}"),
            )
        })?;
        let (output, part) = self.output_paths(&manifest.name, output).await?;
        let chunks = manifest.chunk_count();
        let file = {
            let path = part.clone();
            let size = manifest.size;
            tokio::task::spawn_blocking(move || create_part(&path, size))
                .await
                .map_err(|e| err(ErrorCode::Internal, e.to_string()))?
                .map_err(|e| part_error(&part, &output, e))?
        };
        let manifest = Arc::new(manifest);
        // Chunk keys left by a cancelled earlier download of the same file mean nothing now.
        self.store
            .clear_chunks(&id)
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        let record = DownloadRecord {
            manifest: (*manifest).clone(),
            output: utf8(&output)?,
            part: utf8(&part)?,
            state: DownloadState::Running,
            refetched: 0,
        };
        self.store
            .put_download(&id, &record)
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        // Durable before it starts: a crash from here on resumes it rather than orphaning its
        // partial file.
        self.store
            .flush()
            .await
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        let local = Arc::new(LocalFile::new(
            manifest.clone(),
            file,
            part.clone(),
            Bitfield::new(chunks),
        ));
        self.insert_file(local.clone());
        let dl = Arc::new(Download::new(
            manifest,
            local,
            output,
            part,
            DownloadState::Running,
            0,
        ));
        self.spawn_download(dl.clone()).await;
        Ok(dl)
    }

    /// Adds `dl` to the downloads and starts its task.
    async fn spawn_download(self: &Arc<Self>, dl: Arc<Download>) {
        lock(&self.downloads).insert(dl.id, dl.clone());
        dl.start(self).await;
    }

    /// Where a download of `name` goes: `output` if it names a file, `output/name` if it names
    /// a directory, else the download directory. Checked before any transfer starts.
    async fn output_paths(
        &self,
        name: &str,
        output: Option<&str>,
    ) -> Result<(PathBuf, PathBuf), WireError> {
        let target = match output {
            Some(o) => {
                let p = PathBuf::from(o);
                if !p.is_absolute() {
                    return Err(err(
                        ErrorCode::BadRequest,
                        format!("{o}: the daemon needs an absolute path"),
                    ));
                }
                if p.is_dir() {
                    p.join(name)
                } else {
                    p
                }
            }
            None => {
                let dir = &self.config.download_dir;
                tokio::fs::create_dir_all(dir).await.map_err(|e| {
                    err(
                        ErrorCode::Io,
                        format!("cannot create download directory {}: {e}", dir.display()),
                    )
                })?;
                dir.join(name)
            }
        };
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("/"));
        if !parent.is_dir() {
            return Err(err(
                ErrorCode::NotFound,
                format!("directory {} does not exist", parent.display()),
            ));
        }
        if target.symlink_metadata().is_ok() {
            return Err(err(
                ErrorCode::BadRequest,
                format!(
                    "{} already exists; remove it or choose another --output",
                    target.display()
                ),
            ));
        }
        let mut part = target.clone().into_os_string();
        part.push(".part");
        Ok((target, PathBuf::from(part)))
    }

    /// The local download or share matching `query` (a name, ID or unique ID prefix).
    fn find_local(&self, query: &str) -> Result<FileId, WireError> {
        let q = query.to_ascii_lowercase();
        let by_id = p2p_schema::is_hex_prefix(&q);
        let mut ids: Vec<(FileId, String)> = self
            .files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|f| (f.id, f.manifest.name.clone()))
            .chain(
                self.downloads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .map(|d| (d.id, d.manifest.name.clone())),
            )
            .filter(|(id, name)| name == query || (by_id && id.to_hex().starts_with(&q)))
            .collect();
        ids.sort();
        ids.dedup();
        match ids.as_slice() {
            [] => Err(err(
                ErrorCode::NotFound,
                format!("this daemon has no file or download {query:?}; see 'p2pctl status'"),
            )),
            [(id, _)] => Ok(*id),
            many => Err(err(
                ErrorCode::Ambiguous,
                format!(
                    "{query:?} matches {} files here; use an ID: {}",
                    many.len(),
                    many.iter()
                        .map(|(id, _)| id.to_hex())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    fn local_download(&self, query: &str) -> Result<Arc<Download>, WireError> {
        let id = self.find_local(query)?;
        self.download(&id).ok_or_else(|| {
            err(
                ErrorCode::NotFound,
                format!("{query:?} is shared here, not being downloaded"),
            )
        })
    }

    /// Pauses a running download (it stays paused across restarts).
    pub async fn pause(&self, query: &str) -> Result<FileSummary, WireError> {
        let dl = self.local_download(query)?;
        if dl.state() != DownloadState::Running {
            return Err(err(
                ErrorCode::BadRequest,
                format!("{} is not running ({:?})", dl.manifest.name, dl.state()),
            ));
        }
        dl.stop(self, DownloadState::Paused).await;
        let _ = dl.events.send(download::Event::Failed(format!(
            "paused; resume it with 'p2pctl resume {}'",
            dl.id.short()
        )));
        info!(file = %dl.id.short(), "download paused");
        Ok(local_summary(&dl.manifest))
    }

    /// Resumes a paused or failed download.
    pub async fn resume(self: &Arc<Self>, query: &str) -> Result<FileSummary, WireError> {
        let dl = self.local_download(query)?;
        if dl.state() == DownloadState::Running && dl.retry_now() {
            info!(file = %dl.id.short(), "a stalled download tries again");
            return Ok(local_summary(&dl.manifest));
        }
        match dl.state() {
            DownloadState::Paused | DownloadState::Failed(_) => {}
            other => {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("{} is {other:?}, not paused", dl.manifest.name),
                ))
            }
        }
        info!(file = %dl.id.short(), "download resumed");
        dl.start(self).await;
        Ok(local_summary(&dl.manifest))
    }

    /// Cancels a download: stops it, removes its partial file and forgets it.
    pub async fn cancel(&self, query: &str) -> Result<FileSummary, WireError> {
        let dl = self.local_download(query)?;
        if dl.state() == DownloadState::Complete {
            return Err(err(
                ErrorCode::BadRequest,
                format!(
                    "{} is complete; use 'p2pctl unregister' to stop sharing it",
                    dl.manifest.name
                ),
            ));
        }
        dl.stop(self, DownloadState::Failed("cancelled".into()))
            .await;
        let _ = dl.events.send(download::Event::Failed("cancelled".into()));
        self.forget(&dl.id).await?;
        if let Err(e) = tokio::fs::remove_file(&dl.part).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(part = %dl.part.display(), error = %e, "removing a cancelled download's partial file");
            }
        }
        info!(file = %dl.id.short(), "download cancelled");
        Ok(local_summary(&dl.manifest))
    }

    /// Stops sharing a file (a registered one or a finished download); the file itself stays.
    pub async fn unregister(&self, query: &str) -> Result<FileSummary, WireError> {
        let id = self.find_local(query)?;
        if let Some(dl) = self.download(&id) {
            if dl.state() != DownloadState::Complete {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!(
                        "{} is still being downloaded; use 'p2pctl cancel'",
                        dl.manifest.name
                    ),
                ));
            }
        }
        let manifest = self
            .local_file(&id)
            .map(|f| f.manifest.clone())
            .ok_or_else(|| err(ErrorCode::NotFound, "not shared here"))?;
        self.forget(&id).await?;
        info!(file = %id.short(), "stopped sharing");
        Ok(local_summary(&manifest))
    }

    /// Forgets everything about file `id`: records, chunks, serving, the tracker's holding.
    async fn forget(&self, id: &FileId) -> Result<(), WireError> {
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.downloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let io = |e: Error| err(ErrorCode::Io, e.to_string());
        self.store.remove_share(id).map_err(io)?;
        self.store.remove_download(id).map_err(io)?;
        self.store.clear_chunks(id).map_err(io)?;
        self.store.flush().await.map_err(io)?;
        self.tracker.notify(TrackerRequest::Drop { file_id: *id });
        Ok(())
    }

    /// What this daemon shares and downloads.
    pub fn status(&self) -> StatusReport {
        let mut shares: Vec<ShareStatus> = self
            .files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|f| f.is_complete())
            .map(|f| ShareStatus {
                id: f.id,
                name: f.manifest.name.clone(),
                size: f.manifest.size,
                chunks: f.manifest.chunk_count(),
                path: f.path().display().to_string(),
                uploaded: f.uploaded.load(std::sync::atomic::Ordering::Relaxed),
                problem: f.problem(),
            })
            .collect();
        shares.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        let mut downloads: Vec<_> = self
            .downloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|d| d.status())
            .collect();
        downloads.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        StatusReport {
            info: self.info(),
            tracker_connected: self.tracker.is_connected(),
            shares,
            downloads,
        }
    }

    /// Brings back shares and downloads recorded by an earlier run. After an unclean stop
    /// (`clean` false), chunks written but not yet recorded are re-verified from disk.
    async fn load(self: &Arc<Self>, clean: bool) {
        for (id, rec) in self.store.shares() {
            let identity = rec.identity();
            let manifest = Arc::new(rec.manifest);
            let path = PathBuf::from(&rec.path);
            let chunks = manifest.chunk_count();
            match std::fs::File::open(&path) {
                Ok(file) => {
                    let local = LocalFile::new(manifest, file, path, Bitfield::full(chunks));
                    local.set_source(identity);
                    // Unchanged size and modification time: served without re-hashing.
                    if local.check_source().is_ok() {
                        info!(file = %id.short(), path = %rec.path, "share restored without re-hashing");
                    }
                    self.insert_file(Arc::new(local));
                }
                Err(e) => {
                    warn!(file = %id.short(), path = %rec.path, error = %e, "a shared file cannot be opened; not serving it");
                }
            }
        }
        for (id, rec) in self.store.downloads() {
            let manifest = Arc::new(rec.manifest);
            let (output, part) = (PathBuf::from(&rec.output), PathBuf::from(&rec.part));
            if rec.state == DownloadState::Complete {
                if let Some(local) = self.local_file(&id) {
                    let dl = Download::new(manifest, local, output, part, rec.state, rec.refetched);
                    self.downloads
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, Arc::new(dl));
                }
                continue;
            }
            let file = match open_part(&part) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Stopped between the final rename and recording it complete?
                    if self.adopt_finished(&manifest, &output, &part).await {
                        continue;
                    }
                    warn!(file = %id.short(), part = %rec.part, "partial file is gone; the download starts over");
                    let _ = self.store.clear_chunks(&id);
                    match create_part(&part, manifest.size) {
                        Ok(f) => f,
                        Err(e) => {
                            warn!(file = %id.short(), error = %part_error(&part, &output, e), "cannot restart a download");
                            continue;
                        }
                    }
                }
                Err(e) => {
                    warn!(file = %id.short(), part = %rec.part, error = %e, "cannot reopen a partial file; not resuming it");
                    continue;
                }
            };
            let mut have = self.store.held_chunks(&id, manifest.chunk_count());
            let mut refetched = rec.refetched;
            if !clean && rec.state == DownloadState::Running {
                match self.recover(&id, &manifest, &file, &have).await {
                    Ok(r) => {
                        for &i in &r.good {
                            have.set(i);
                        }
                        refetched += r
                            .torn
                            .iter()
                            .filter_map(|&i| manifest.chunk_range(i))
                            .map(|(_, len)| u64::from(len))
                            .sum::<u64>();
                        if !r.torn.is_empty() {
                            let updated = DownloadRecord {
                                manifest: (*manifest).clone(),
                                output: rec.output.clone(),
                                part: rec.part.clone(),
                                state: rec.state.clone(),
                                refetched,
                            };
                            if let Err(e) = self.store.put_download(&id, &updated) {
                                warn!(error = %e, "saving download state");
                            }
                        }
                    }
                    Err(e) => {
                        warn!(file = %id.short(), error = %e, "re-verifying the partial file")
                    }
                }
            }
            let local = Arc::new(LocalFile::new(manifest.clone(), file, part.clone(), have));
            self.insert_file(local.clone());
            let dl = Arc::new(Download::new(
                manifest,
                local,
                output,
                part,
                rec.state.clone(),
                refetched,
            ));
            if rec.state == DownloadState::Running {
                info!(file = %id.short(), have = dl.local.have_count(), "resuming download");
                self.spawn_download(dl).await;
            } else {
                self.downloads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, dl);
            }
        }
    }

    /// Recognises a download that was renamed into place but not recorded complete (the daemon
    /// stopped in between): its partial file is gone and its output holds exactly the bytes
    /// its manifest names (every chunk re-verified). Then it is recorded complete and shared,
    /// as the finished download would have been. Returns whether it was.
    async fn adopt_finished(&self, manifest: &Arc<Manifest>, output: &Path, part: &Path) -> bool {
        let id = manifest.file_id();
        let opened = std::fs::File::open(output).and_then(|f| Ok((f.metadata()?, f)));
        let Ok((meta, file)) = opened else {
            return false;
        };
        if !meta.is_file() || meta.len() != manifest.size {
            return false;
        }
        let verified = {
            let (manifest, file) = (manifest.clone(), file.try_clone());
            tokio::task::spawn_blocking(move || {
                let none = Bitfield::new(manifest.chunk_count());
                crate::recover::scan(&manifest, &file?, &none)
            })
            .await
        };
        let good = match verified {
            Ok(Ok(found)) => found.good.len() as u32 == manifest.chunk_count(),
            _ => false,
        };
        if !good {
            return false;
        }
        let identity = crate::local::Identity::of(&meta);
        let Some(path) = output.to_str() else {
            return false;
        };
        let share = ShareRecord::new((**manifest).clone(), path.to_string(), identity);
        if let Err(e) = self.store.put_share(&id, &share) {
            warn!(error = %e, "recording a finished download");
            return false;
        }
        let chunks = manifest.chunk_count();
        let local = LocalFile::new(
            manifest.clone(),
            file,
            output.to_path_buf(),
            Bitfield::full(chunks),
        );
        local.set_source(identity);
        let local = Arc::new(local);
        self.insert_file(local.clone());
        let dl = Download::new(
            manifest.clone(),
            local,
            output.to_path_buf(),
            part.to_path_buf(),
            DownloadState::Complete,
            0,
        );
        dl.set_state(self, DownloadState::Complete);
        let _ = self.store.clear_chunks(&id);
        lock(&self.downloads).insert(id, Arc::new(dl));
        info!(file = %id.short(), output = %output.display(), "a download finished before the daemon stopped: its output re-verified and recorded complete");
        true
    }

    /// Re-verifies the unrecorded chunks of a partial file; the good ones are synced and
    /// recorded (the usual order), the torn ones returned to be fetched again.
    async fn recover(
        &self,
        id: &FileId,
        manifest: &Arc<Manifest>,
        file: &std::fs::File,
        have: &Bitfield,
    ) -> Result<crate::recover::Recovered, Error> {
        let file = file
            .try_clone()
            .map_err(|e| Error::io("reopening a partial file", e))?;
        let (manifest, have) = (manifest.clone(), have.clone());
        let found = tokio::task::spawn_blocking(move || {
            let found = crate::recover::scan(&manifest, &file, &have)?;
            if !found.good.is_empty() {
                file.sync_data()?;
            }
            Ok::<_, std::io::Error>(found)
        })
        .await
        .map_err(|e| Error::Other(e.to_string()))?
        .map_err(|e| Error::io("re-verifying a partial file", e))?;
        self.store.record_chunks(id, &found.good)?;
        info!(
            file = %id.short(),
            recovered = found.good.len(),
            torn = found.torn.len(),
            "re-verified chunks written before an unclean stop"
        );
        Ok(found)
    }
}

/// A summary of a local file, for replies that need no tracker.
fn local_summary(m: &Manifest) -> FileSummary {
    FileSummary {
        id: m.file_id(),
        name: m.name.clone(),
        size: m.size,
        chunk_size: m.chunk_size,
        chunks: m.chunk_count(),
        seeders: 0,
        holders: 0,
    }
}

fn utf8(p: &Path) -> Result<String, WireError> {
    p.to_str().map(str::to_string).ok_or_else(|| {
        err(
            ErrorCode::BadRequest,
            format!("{}: paths must be valid UTF-8", p.display()),
        )
    })
}

/// Why a query did not resolve to one file.
pub enum Resolve {
    Ambiguous(Vec<FileSummary>),
    Error(WireError),
}

/// What to announce after (re)connecting: complete files first (registering them), then
/// partial holdings.
fn announce_all(files: &Files) -> Vec<TrackerRequest> {
    let files = files.read().unwrap_or_else(|p| p.into_inner());
    let (stale, usable): (Vec<_>, Vec<_>) = files.values().partition(|f| f.problem().is_some());
    let (complete, partial): (Vec<_>, Vec<_>) = usable.into_iter().partition(|f| f.is_complete());
    // The tracker may still list files we no longer serve (from before a restart).
    let mut out: Vec<TrackerRequest> = stale
        .into_iter()
        .map(|f| TrackerRequest::Drop { file_id: f.id })
        .collect();
    out.extend(complete.into_iter().map(|f| TrackerRequest::Register {
        manifest: (*f.manifest).clone(),
    }));
    out.extend(
        partial
            .into_iter()
            .map(|f| (f.id, f.have()))
            .filter(|(_, have)| have.count() > 0)
            .map(|(file_id, chunks)| TrackerRequest::Have { file_id, chunks }),
    );
    out
}

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
    // Opening may wait for the database's lock: off the executor.
    let dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await
        .map_err(|e| Error::Other(format!("opening the state database: {e}")))??;
    let clean = store.take_clean_flag().await?;
    let peer_id = store.peer_id()?;
    if !clean {
        info!("the previous run did not stop cleanly: unrecorded chunks will be re-verified");
    }
    let bound = peers
        .local_addr()
        .map_err(|e| Error::io("reading the bound peer address", e))?;
    let listen = config.advertise.unwrap_or(bound);
    let (stop, stop_rx) = watch::channel(false);
    let files: Files = Arc::default();
    let announce: Announce = {
        let files = files.clone();
        Arc::new(move || announce_all(&files))
    };
    let identity = Identity {
        peer_id,
        listen,
        secret: config.secret.clone(),
    };
    // The session waits until what we hold is loaded: its first announcement must be whole.
    let (loaded, gate) = tokio::sync::oneshot::channel();
    let (tracker, tracker_task) = TrackerClient::start(
        config.tracker.clone(),
        identity,
        announce,
        gate,
        stop_rx.clone(),
    );
    let node = Arc::new(Node {
        upload_slots: Semaphore::new(config.max_uploads.max(1)),
        upload_limit: RateLimit::new(config.upload_rate),
        fetching: Mutex::default(),
        fetch_epoch: std::sync::atomic::AtomicU64::new(0),
        config,
        peer_id,
        listen,
        store,
        tracker,
        files,
        downloads: Mutex::default(),
        starting: Mutex::default(),
        stop,
    });
    node.load(clean).await;
    let _ = loaded.send(());
    let server = tokio::spawn(crate::serve::serve(node.clone(), peers, stop_rx.clone()));
    let socket = node.config.socket.clone();
    let controller = tokio::spawn(crate::control::serve(
        node.clone(),
        control,
        stop_rx.clone(),
    ));
    let status = format!(
        "serving peers on {bound}, control socket {}",
        socket.display()
    );
    info!(peer_id = %peer_id.short(), "p2pd ready: {status}");
    ready(&status);

    let mut stopping = stop_rx.clone();
    tokio::select! {
        () = shutdown => {}
        _ = stopping.wait_for(|s| *s) => {}
    }
    info!("shutting down");
    p2p_schema::service::notify_stopping();
    node.request_stop();
    // The tracker session says Bye; bounded so a dead tracker cannot hold us up.
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker_task).await;
    let _ = server.await;
    let _ = controller.await;
    // Downloads commit what they have written, then stop.
    let downloads: Vec<_> = lock(&node.downloads).values().cloned().collect();
    for dl in downloads {
        let _ = tokio::time::timeout(Duration::from_secs(5), dl.join()).await;
    }
    node.store.flush().await?;
    node.store.mark_clean().await?;
    info!("stopped");
    Ok(())
}
