//! The download manager: starting one download per file at a distinct output, pausing,
//! resuming and cancelling.

use super::*;

impl Node {
    /// Starts downloading `file` (or returns the download already under way).
    pub async fn start_download(
        self: &Arc<Self>,
        file: &FileSummary,
        output: Option<&str>,
    ) -> Result<Arc<Download>, WireError> {
        self.one_start_at_a_time(file.id, self.start_download_alone(file, output))
            .await
    }

    /// Runs `start` with no other start of content `id` under way (a second one waits for
    /// the first, then finds what it started: check-and-insert is atomic).
    pub(super) async fn one_start_at_a_time<T>(
        &self,
        id: FileId,
        start: impl std::future::Future<Output = T>,
    ) -> T {
        let gate = lock(&self.starting).entry(id).or_default().clone();
        let started = {
            let _only = gate.lock().await;
            start.await
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
                    dl.start(&self.ctx).await;
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
        let manifest = self.verified_manifest(&id).await?;
        if manifest.collection {
            return Err(err(
                ErrorCode::Internal,
                "a collection is downloaded as a tree, not as one file",
            ));
        }
        let (output, part) = self.output_paths(&manifest.name, output).await?;
        self.begin_download(manifest, output, part, None).await
    }

    /// Starts a new download of `manifest`'s file into `part`, renamed to `output` when
    /// complete; for `collection`, if it is one of its files.
    pub(super) async fn begin_download(
        self: &Arc<Self>,
        manifest: Manifest,
        output: PathBuf,
        part: PathBuf,
        collection: Option<FileId>,
    ) -> Result<Arc<Download>, WireError> {
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
        self.record_new_download(&manifest, &output, &part, collection)
            .await?;
        let local = Arc::new(LocalFile::new(
            manifest.clone(),
            file,
            part.clone(),
            Bitfield::new(chunks),
        ));
        local.set_collection(collection);
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

    /// The manifest of file `id`, from the tracker, checked to hash to `id` (the tracker
    /// cannot substitute hashes).
    pub(super) async fn verified_manifest(&self, id: &FileId) -> Result<Manifest, WireError> {
        let manifest = self.tracker.manifest(*id).await?;
        manifest.verify(id).map_err(|e| {
            err(
                ErrorCode::BadRequest,
                format!("the tracker sent a bad manifest: {e}"),
            )
        })?;
        Ok(manifest)
    }

    /// Records a new download, durably, before it starts: a crash from then on resumes it
    /// rather than orphaning its partial file.
    async fn record_new_download(
        &self,
        manifest: &Manifest,
        output: &Path,
        part: &Path,
        collection: Option<FileId>,
    ) -> Result<(), WireError> {
        let id = manifest.file_id();
        let io = |e: Error| err(ErrorCode::Io, e.to_string());
        // Chunk keys left by a cancelled earlier download of the same file mean nothing now.
        self.store.clear_chunks(&id).map_err(io)?;
        let record = DownloadRecord {
            manifest: manifest.clone(),
            output: utf8(output)?,
            part: utf8(part)?,
            state: DownloadState::Running,
            refetched: 0,
            collection,
        };
        self.store.put_download(&id, &record).map_err(io)?;
        if collection.is_some() {
            // A collection's file: sled's own flush (every 500 ms) is soon enough. After a
            // crash before it, the collection's download finds the partial file with no
            // record in its own directory, and starts it again.
            return Ok(());
        }
        self.store.flush().await.map_err(io)
    }

    /// Adds `dl` to the downloads and starts its task.
    pub(super) async fn spawn_download(self: &Arc<Self>, dl: Arc<Download>) {
        lock(&self.downloads).insert(dl.id, dl.clone());
        dl.start(&self.ctx).await;
    }

    /// Where a download of `name` goes: `output` if it names a file, `output/name` if it names
    /// a directory, else the download directory. Checked before any transfer starts.
    pub(super) async fn output_paths(
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
        if let Some(cid) = self.find_collection(query) {
            return self.pause_tree(&cid).await;
        }
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
        if let Some(cid) = self.find_collection(query) {
            return self.resume_tree(&cid).await;
        }
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
        dl.start(&self.ctx).await;
        Ok(local_summary(&dl.manifest))
    }

    /// Cancels a download: stops it, removes its partial file and forgets it.
    pub async fn cancel(&self, query: &str) -> Result<FileSummary, WireError> {
        if let Some(cid) = self.find_collection(query) {
            return self.cancel_tree(&cid).await;
        }
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
}
