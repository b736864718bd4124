//! `pause`, `resume`, `cancel` and `unregister` of a collection: they act on the collection's
//! download and on every file of it at once.

use super::*;

impl Node {
    /// The collection (downloaded here, or registered) that `query` names, if one does: by
    /// its name or a prefix of its ID.
    pub(super) fn find_collection(&self, query: &str) -> Option<FileId> {
        let q = query.to_ascii_lowercase();
        let by_id = p2p_schema::is_hex_prefix(&q);
        let name = query.strip_suffix('/').unwrap_or(query);
        let matches = |id: &FileId, n: &str| n == name || (by_id && id.to_hex().starts_with(&q));
        let mut ids: Vec<FileId> = lock(&self.trees)
            .values()
            .filter(|t| matches(&t.id, &t.manifest.name))
            .map(|t| t.id)
            .chain(
                read_lock(&self.files)
                    .values()
                    .filter(|f| f.manifest.collection && matches(&f.id, &f.manifest.name))
                    .map(|f| f.id),
            )
            .collect();
        ids.sort();
        ids.dedup();
        match ids.as_slice() {
            [id] => Some(*id),
            _ => None,
        }
    }

    /// The downloads of collection `cid`'s files, and of its index.
    fn tree_downloads(&self, cid: &FileId) -> Vec<Arc<Download>> {
        lock(&self.downloads)
            .values()
            .filter(|d| d.id == *cid || d.local.collection() == Some(*cid))
            .cloned()
            .collect()
    }

    fn running_tree(&self, cid: &FileId) -> Result<Arc<Tree>, WireError> {
        self.tree(cid).ok_or_else(|| {
            err(
                ErrorCode::BadRequest,
                "this collection is shared here, not being downloaded",
            )
        })
    }

    /// Pauses a collection's download and every download of its files.
    pub(super) async fn pause_tree(&self, cid: &FileId) -> Result<FileSummary, WireError> {
        let tree = self.running_tree(cid)?;
        if tree.state() != DownloadState::Running {
            return Err(err(
                ErrorCode::BadRequest,
                format!(
                    "{}/ is not running ({:?})",
                    tree.manifest.name,
                    tree.state()
                ),
            ));
        }
        tree.halt().await;
        if tree.state() == DownloadState::Complete {
            // It completed while it was being stopped.
            return Err(err(
                ErrorCode::BadRequest,
                format!("{}/ completed meanwhile", tree.manifest.name),
            ));
        }
        for dl in self.tree_downloads(cid) {
            if dl.state() == DownloadState::Running {
                dl.stop(self, DownloadState::Paused).await;
            }
        }
        tree.set_state(self, DownloadState::Paused);
        let _ = tree.events.send(TreeEvent::Failed(format!(
            "paused; resume it with 'p2pctl resume {}'",
            cid.short()
        )));
        info!(collection = %cid.short(), "collection download paused");
        Ok(local_summary(&tree.manifest))
    }

    /// Resumes a paused or failed collection download.
    pub(super) async fn resume_tree(
        self: &Arc<Self>,
        cid: &FileId,
    ) -> Result<FileSummary, WireError> {
        let tree = self.running_tree(cid)?;
        match tree.state() {
            DownloadState::Paused | DownloadState::Failed(_) => {}
            other => {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("{}/ is {other:?}, not paused", tree.manifest.name),
                ))
            }
        }
        info!(collection = %cid.short(), "collection download resumed");
        self.run_tree(&tree).await;
        Ok(local_summary(&tree.manifest))
    }

    /// Cancels a collection's download: stops it and its files' downloads, removes the
    /// partial tree and forgets them.
    pub(super) async fn cancel_tree(&self, cid: &FileId) -> Result<FileSummary, WireError> {
        let tree = self.running_tree(cid)?;
        if tree.state() == DownloadState::Complete {
            return Err(err(
                ErrorCode::BadRequest,
                format!(
                    "{}/ is complete; use 'p2pctl unregister' to stop sharing it",
                    tree.manifest.name
                ),
            ));
        }
        tree.halt().await;
        if tree.state() == DownloadState::Complete {
            return Err(err(
                ErrorCode::BadRequest,
                format!(
                    "{}/ completed meanwhile; use 'p2pctl unregister' to stop sharing it",
                    tree.manifest.name
                ),
            ));
        }
        for dl in self.tree_downloads(cid) {
            dl.stop(self, DownloadState::Failed("cancelled".into()))
                .await;
            let _ = dl.events.send(download::Event::Failed("cancelled".into()));
            self.forget(&dl.id).await?;
            let _ = tokio::fs::remove_file(&dl.part).await;
        }
        // Files of it finished meanwhile lie in the partial tree, which goes whatever lists
        // them, and its pack among this daemon's own files.
        self.release_files(cid, Some(&tree.part)).await?;
        if let Err(e) = tokio::fs::remove_dir_all(&tree.part).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(part = %tree.part.display(), error = %e, "removing a cancelled collection's partial tree");
            }
        }
        self.forget_tree(cid).await?;
        let _ = tree.events.send(TreeEvent::Failed("cancelled".into()));
        info!(collection = %cid.short(), "collection download cancelled");
        Ok(local_summary(&tree.manifest))
    }

    /// Stops sharing a collection (registered, or downloaded and complete): its index and its
    /// files; the files themselves stay.
    pub(super) async fn unregister_tree(&self, cid: &FileId) -> Result<FileSummary, WireError> {
        if let Some(tree) = self.tree(cid) {
            if tree.state() != DownloadState::Complete {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!(
                        "{}/ is still being downloaded; use 'p2pctl cancel'",
                        tree.manifest.name
                    ),
                ));
            }
        }
        let manifest = self
            .local_file(cid)
            .map(|f| f.manifest.clone())
            .or_else(|| self.tree(cid).map(|t| t.manifest.clone()))
            .ok_or_else(|| err(ErrorCode::NotFound, "not shared here"))?;
        self.release_files(cid, None).await?;
        self.forget_tree(cid).await?;
        info!(collection = %cid.short(), "stopped sharing a collection");
        Ok(local_summary(&manifest))
    }

    /// Stops holding collection `cid`'s files (those under `partial` only, if given, and its
    /// pack): what another collection here lists too is handed over to it, the rest
    /// forgotten; this daemon's own copies (the pack) are deleted, the tree's files not. The
    /// caller flushes.
    async fn release_files(&self, cid: &FileId, partial: Option<&Path>) -> Result<(), WireError> {
        let own = self.collections_dir();
        let members: Vec<(FileId, PathBuf, bool)> = read_lock(&self.files)
            .values()
            .filter(|f| f.collection() == Some(*cid))
            .map(|f| (f.id, f.path(), registration(f).is_some()))
            .filter(|(_, path, _)| {
                partial.is_none_or(|p| path.starts_with(p) || path.starts_with(&own))
            })
            .collect();
        let others = self.held_by_other_collections(cid).await;
        for (id, path, registered) in members {
            // A partial tree goes whatever lists it.
            let kept = partial.is_none() || path.starts_with(&own);
            if let Some(other) = others.get(&id).filter(|_| kept) {
                self.hand_over(&id, *other);
                continue;
            }
            self.forget_quietly(&id)?;
            if registered {
                self.tracker.notify(TrackerRequest::Drop { file_id: id });
            }
            if path.starts_with(&own) {
                let _ = tokio::fs::remove_file(&path).await;
            }
        }
        Ok(())
    }

    /// Forgets collection `cid` itself: its index (this daemon's own copy, deleted), its
    /// record, its download; flushed.
    async fn forget_tree(&self, cid: &FileId) -> Result<(), WireError> {
        if let Some(index) = self.local_file(cid) {
            let _ = tokio::fs::remove_file(index.path()).await;
        }
        self.forget(cid).await?;
        lock(&self.trees).remove(cid);
        self.store
            .remove_collection(cid)
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        self.store
            .flush()
            .await
            .map_err(|e| err(ErrorCode::Io, e.to_string()))
    }

    /// The files (and packs) that collections other than `cid`, held or being downloaded
    /// here, list: content ID to one such collection. Read from their indexes.
    async fn held_by_other_collections(&self, cid: &FileId) -> HashMap<FileId, FileId> {
        let indexes: Vec<(FileId, PathBuf)> = lock(&self.trees)
            .keys()
            .filter(|id| *id != cid)
            .filter_map(|id| Some((*id, self.local_file(id)?.path())))
            .collect();
        tokio::task::spawn_blocking(move || {
            let mut held = HashMap::new();
            for (other, path) in indexes {
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                let Ok(c) = p2p_schema::Collection::decode(&bytes) else {
                    continue;
                };
                let pack = c.pack.as_ref().map(|p| p.manifest().file_id());
                for id in c.entries.iter().filter_map(|e| e.file_id()).chain(pack) {
                    held.insert(id, other);
                }
            }
            held
        })
        .await
        .unwrap_or_default()
    }

    /// File `id` is held from now on for collection `other`.
    fn hand_over(&self, id: &FileId, other: FileId) {
        let Some(local) = self.local_file(id) else {
            return;
        };
        local.set_collection(Some(other));
        let (Ok(path), Some(identity)) = (utf8(&local.path()), local.source()) else {
            return;
        };
        let mut record = ShareRecord::new((*local.manifest).clone(), path, identity);
        record.collection = Some(other);
        if let Err(e) = self.store.put_share(id, &record) {
            warn!(error = %e, "handing a file over to another collection");
        }
    }

    /// Serves the pack of a tree held whole again, as its index says (read from disk).
    async fn serve_pack_again(&self, tree: &Tree) {
        let Some(index) = self.local_file(&tree.id) else {
            return;
        };
        let path = index.path();
        let read = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            p2p_schema::Collection::decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
        })
        .await;
        match read {
            Ok(Ok(collection)) => self.serve_pack(tree.id, &collection, &tree.output),
            Ok(Err(e)) => warn!(collection = %tree.id.short(), "{e}; its pack is not served"),
            Err(e) => warn!(collection = %tree.id.short(), error = %e, "reading an index"),
        }
    }

    /// Brings back a collection download recorded by an earlier run (after its files'
    /// downloads): a running one goes on.
    pub(super) async fn load_tree(self: &Arc<Self>, rec: crate::store::CollectionRecord) {
        let state = rec.state.clone();
        let reserved = rec.reserved;
        let tree = Arc::new(Tree::new(
            Arc::new(rec.manifest),
            PathBuf::from(rec.output),
            PathBuf::from(rec.part),
            state.clone(),
            (rec.files, rec.bytes),
        ));
        tree.reserved
            .store(reserved, std::sync::atomic::Ordering::Relaxed);
        lock(&self.trees).insert(tree.id, tree.clone());
        if state == DownloadState::Complete {
            self.serve_pack_again(&tree).await;
        }
        if state == DownloadState::Running {
            info!(collection = %tree.id.short(), "resuming a collection download");
            self.run_tree(&tree).await;
        }
    }
}
