//! Downloading a collection: its index first (an ordinary file, then shared like one), then
//! every file it lists, each an ordinary download marked as the collection's (resumed after
//! a restart like any other), into `OUTPUT.part/`; when every file is verified the tree is
//! renamed to `OUTPUT`. A file this daemon already holds is copied, not fetched.
//!
//! Nothing is written for a collection whose index fails its checks
//! ([`Collection::decode`]): no path in it can lead outside `OUTPUT.part/`.

use std::collections::HashSet;

use p2p_schema::{Collection, Entry};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::tree::{io, joined, part_taken, TreeProgress, LARGE_FILE, PARALLEL_FILES};
use super::tree_fs::{adopt, copy_into, finish_tree, lay_out, verify_in_place};
use super::*;
use crate::local::Identity;

impl Node {
    /// Starts downloading collection `file` (or returns its download already under way).
    pub async fn start_tree(
        self: &Arc<Self>,
        file: &FileSummary,
        output: Option<&str>,
    ) -> Result<Arc<Tree>, WireError> {
        self.one_start_at_a_time(file.id, self.start_tree_alone(file, output))
            .await
    }

    async fn start_tree_alone(
        self: &Arc<Self>,
        file: &FileSummary,
        output: Option<&str>,
    ) -> Result<Arc<Tree>, WireError> {
        if let Some(tree) = self.tree(&file.id) {
            match tree.state() {
                DownloadState::Running => return Ok(tree),
                DownloadState::Paused | DownloadState::Failed(_) => {
                    self.run_tree(&tree).await;
                    return Ok(tree);
                }
                DownloadState::Complete => {
                    return Err(err(
                        ErrorCode::BadRequest,
                        format!(
                            "this daemon already has {}/ (ID {}) at {}",
                            file.name,
                            file.id.short(),
                            tree.output.display()
                        ),
                    ))
                }
            }
        }
        if self
            .local_file(&file.id)
            .is_some_and(|f| f.is_complete() && f.collection().is_none())
        {
            return Err(err(
                ErrorCode::BadRequest,
                format!(
                    "this daemon shares {}/ (ID {}) already",
                    file.name,
                    file.id.short()
                ),
            ));
        }
        let manifest = self.verified_manifest(&file.id).await?;
        if !manifest.collection {
            return Err(err(
                ErrorCode::Internal,
                format!("{} is not a collection", file.name),
            ));
        }
        let (output, part) = self.output_paths(&manifest.name, output).await?;
        if part.symlink_metadata().is_ok() {
            return Err(part_taken(&part, &output));
        }
        let tree = Arc::new(Tree::new(
            Arc::new(manifest),
            output,
            part,
            DownloadState::Running,
            (0, 0),
        ));
        let io = |e: Error| err(ErrorCode::Io, e.to_string());
        self.store
            .put_collection(&tree.id, &tree.record())
            .map_err(io)?;
        self.store.flush().await.map_err(io)?;
        lock(&self.trees).insert(tree.id, tree.clone());
        self.run_tree(&tree).await;
        Ok(tree)
    }

    /// Starts `tree`'s task (state `running`) unless one runs.
    pub(super) async fn run_tree(self: &Arc<Self>, tree: &Arc<Tree>) {
        let mut task = tree.task.lock().await;
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let stop = self.stop_token().child_token();
        *lock(&tree.halt) = stop.clone();
        tree.set_state(self, DownloadState::Running);
        let (node, t) = (self.clone(), tree.clone());
        let span =
            tracing::info_span!("collection", id = %tree.id.short(), name = %tree.manifest.name);
        *task = Some(tokio::spawn(
            async move {
                match node.fetch_tree(&t, &stop).await {
                    Ok(true) => {
                        t.set_state(&node, DownloadState::Complete);
                        if let Err(e) = node.store.flush().await {
                            warn!(error = %e, "flushing state after a collection");
                        }
                        info!(output = %t.output.display(), "{}/ has completed downloading.", t.manifest.name);
                        let _ = t.events.send(TreeEvent::Completed);
                    }
                    Ok(false) => info!(state = ?t.state(), "collection download stopped"),
                    Err(e) => {
                        warn!("collection download failed: {e}");
                        t.set_state(&node, DownloadState::Failed(e.message.clone()));
                        let _ = t.events.send(TreeEvent::Failed(e.message));
                    }
                }
            }
            .instrument(span),
        ));
    }

    /// Fetches the index, then every file, then moves the tree into place. `Ok(false)` if
    /// stopped first.
    async fn fetch_tree(
        self: &Arc<Self>,
        tree: &Arc<Tree>,
        stop: &CancellationToken,
    ) -> Result<bool, WireError> {
        let Some(bytes) = self.fetch_index(tree, stop).await? else {
            return Ok(false);
        };
        // Checking an index of a million entries takes a while: off the async threads.
        let checked = tokio::task::spawn_blocking(move || Collection::decode(&bytes))
            .await
            .map_err(joined)?;
        let collection = checked.map_err(|e| {
            err(
                ErrorCode::BadRequest,
                format!("collection {} refused: {e}", tree.manifest.name),
            )
        })?;
        let collection = Arc::new(collection);
        let reserved = tree.reserved.load(std::sync::atomic::Ordering::Relaxed);
        if reserved && !tree.part.exists() && tree.output.is_dir() {
            // Moved into place just before the daemon stopped, it seems: complete only if
            // every file there is what the index says.
            let (output, c) = (tree.output.clone(), collection.clone());
            tokio::task::spawn_blocking(move || verify_in_place(&output, &c))
                .await
                .map_err(joined)??;
            self.relocate_members(tree, &collection, &tree.output).await;
            self.serve_pack(tree.id, &collection, &tree.output);
            return Ok(true);
        }
        {
            let (files, bytes) = (collection.file_count() as u64, collection.total_size());
            tree.advance(|p| {
                *p = TreeProgress {
                    files,
                    bytes,
                    ..TreeProgress::default()
                }
            });
        }
        self.reserve_part(tree).await?;
        let (part, c) = (tree.part.clone(), collection.clone());
        tokio::task::spawn_blocking(move || lay_out(&part, &c))
            .await
            .map_err(joined)??;
        let Some(done_ids) = self.fetch_members(tree, &collection, stop).await? else {
            return Ok(false);
        };
        self.place_tree(tree, &collection, done_ids).await
    }

    /// Fetches (or copies) each distinct content of the tree once, a few files at a time;
    /// where each went. `None` if stopped first.
    async fn fetch_members(
        self: &Arc<Self>,
        tree: &Arc<Tree>,
        collection: &Arc<Collection>,
        stop: &CancellationToken,
    ) -> Result<Option<HashMap<FileId, PathBuf>>, WireError> {
        tree.advance(|p| {
            p.files_done = collection
                .entries
                .iter()
                .filter(|e| matches!(e, Entry::File { size: 0, .. }))
                .count() as u64
        });
        // The small files first, all at once, in their pack.
        let Some(mut done_ids) = self.fetch_pack(tree, collection, stop).await? else {
            return Ok(None);
        };
        // Then one fetch per content; files with the same content are copied from the first.
        // Each manifest is built when its fetch starts: a copy of every file's hashes would
        // stay in memory for the whole download.
        let mut seen: HashSet<FileId> = done_ids.keys().copied().collect();
        let mut firsts = Vec::new();
        for e in &collection.entries {
            if let Entry::File { size: 1.., .. } = e {
                if e.file_id().is_some_and(|id| seen.insert(id)) {
                    firsts.push(e);
                }
            }
        }
        let mut running = tokio::task::JoinSet::new();
        let mut queue = firsts.into_iter().peekable();
        // Whether a large file runs (alone).
        let mut alone = false;
        loop {
            while !alone && running.len() < PARALLEL_FILES {
                let Some(large) = queue.peek().map(|e| e.size() >= LARGE_FILE) else {
                    break;
                };
                if large && !running.is_empty() {
                    break;
                }
                let Some((path, manifest)) = queue
                    .next()
                    .and_then(|e| Some((e.path().to_string(), e.manifest()?)))
                else {
                    break;
                };
                alone = large;
                let (node, t, stop) = (self.clone(), tree.clone(), stop.clone());
                running.spawn(async move {
                    let id = manifest.file_id();
                    let dest = t.part.join(&path);
                    let got = node.fetch_member(&t, manifest, &dest, 1, &stop).await;
                    (id, dest, got)
                });
            }
            let Some(joined_one) = running.join_next().await else {
                break;
            };
            // If a large file ran, it ran alone: it is the one that ended.
            alone = false;
            let (id, dest, got) = joined_one.map_err(joined)?;
            if !got? {
                return Ok(None);
            }
            done_ids.insert(id, dest);
        }
        Ok(Some(done_ids))
    }

    /// Copies what was fetched once to its other places, sets modes and moves the tree into
    /// place; its files are served from there.
    async fn place_tree(
        &self,
        tree: &Arc<Tree>,
        collection: &Arc<Collection>,
        done_ids: HashMap<FileId, PathBuf>,
    ) -> Result<bool, WireError> {
        let (part, c, output) = (tree.part.clone(), collection.clone(), tree.output.clone());
        let t = tree.clone();
        self.hold_members(tree, collection);
        let finished =
            tokio::task::spawn_blocking(move || finish_tree(&part, &output, &c, &done_ids, &t))
                .await
                .map_err(joined)
                .and_then(|r| r);
        let base = if finished.is_ok() {
            &tree.output
        } else {
            &tree.part
        };
        self.relocate_members(tree, collection, base).await;
        if finished.is_ok() {
            self.serve_pack(tree.id, collection, &tree.output);
        }
        finished.map(|()| true)
    }

    /// Creates the directory the tree is built in, unless it is this download's already.
    async fn reserve_part(&self, tree: &Tree) -> Result<(), WireError> {
        use std::sync::atomic::Ordering::Relaxed;
        match tokio::fs::create_dir(&tree.part).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !tree.reserved.load(Relaxed) {
                    return Err(part_taken(&tree.part, &tree.output));
                }
            }
            Err(e) => return Err(io(format!("creating {}", tree.part.display()))(e)),
        }
        if !tree.reserved.swap(true, Relaxed) {
            // Durably, before anything is written in it: after a restart, only a directory
            // this download made is taken for its own.
            let io = |e: Error| err(ErrorCode::Io, e.to_string());
            self.store
                .put_collection(&tree.id, &tree.record())
                .map_err(io)?;
            self.store.flush().await.map_err(io)?;
        }
        Ok(())
    }

    /// The collection's index, from its share here or downloaded (and then shared).
    async fn fetch_index(
        self: &Arc<Self>,
        tree: &Arc<Tree>,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<u8>>, WireError> {
        let id = tree.id;
        let held = self.local_file(&id).filter(|f| f.is_complete());
        let path = match held {
            Some(local) => local.path(),
            None => {
                let dl = match self.download(&id) {
                    Some(dl) => dl,
                    None => {
                        let path = self.index_path(&id);
                        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                        tokio::fs::create_dir_all(&dir)
                            .await
                            .map_err(io(format!("creating {}", dir.display())))?;
                        // Left by an index download that ended before it was recorded.
                        let _ = tokio::fs::remove_file(&path).await;
                        let mut part = path.clone().into_os_string();
                        part.push(".part");
                        let part = PathBuf::from(part);
                        let _ = tokio::fs::remove_file(&part).await;
                        self.begin_download((*tree.manifest).clone(), path, part, None)
                            .await?
                    }
                };
                if !self.wait_download(&dl, stop, None).await? {
                    return Ok(None);
                }
                dl.output.clone()
            }
        };
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(io(format!("reading {}", path.display())))?;
        Ok(Some(bytes))
    }

    /// Puts one file of `tree` (or its pack) at `dest`: copied from a copy held here, or
    /// downloaded; it completes `files` of the tree's files. `Ok(false)` if stopped first.
    pub(super) async fn fetch_member(
        self: &Arc<Self>,
        tree: &Arc<Tree>,
        manifest: Manifest,
        dest: &Path,
        files: u64,
        stop: &CancellationToken,
    ) -> Result<bool, WireError> {
        let id = manifest.file_id();
        let size = manifest.size;
        let counted = |tree: &Tree| {
            tree.advance(|p| {
                p.files_done += files;
                p.bytes_done += size;
            })
        };
        // Held whole here already: at its place (a restart), or elsewhere (copied).
        if let Some(local) = self.held_whole(&id).await? {
            let from = local.path();
            if from != dest {
                let to = dest.to_path_buf();
                let scratch = tree.scratch();
                tokio::task::spawn_blocking(move || copy_into(&from, &to, &scratch))
                    .await
                    .map_err(joined)??;
                info!(file = %id.short(), "a file held here already is copied, not fetched");
            }
            counted(tree);
            return Ok(true);
        }
        let start = self.member_download(tree, manifest, dest);
        let Some(dl) = self.one_start_at_a_time(id, start).await? else {
            // Found whole in place (its records were lost in a crash) and adopted.
            counted(tree);
            return Ok(true);
        };
        let t = tree.clone();
        if !self.wait_download(&dl, stop, Some(&t)).await? {
            return Ok(false);
        }
        if dl.output != dest {
            // Another download of the same content (alone, or for another collection).
            let (from, to) = (dl.output.clone(), dest.to_path_buf());
            let scratch = tree.scratch();
            tokio::task::spawn_blocking(move || copy_into(&from, &to, &scratch))
                .await
                .map_err(joined)??;
        } else {
            self.retire(&dl);
        }
        tree.advance(|p| p.files_done += files);
        Ok(true)
    }

    /// File `id` held whole here in a file of its own, still as it was recorded (checked by a
    /// `stat`, off the async threads). Not a pack served from its files: it has no file to
    /// read or copy.
    pub(super) async fn held_whole(
        &self,
        id: &FileId,
    ) -> Result<Option<Arc<LocalFile>>, WireError> {
        let Some(local) = self
            .local_file(id)
            .filter(|f| f.is_complete() && f.spans().is_none())
        else {
            return Ok(None);
        };
        let l = local.clone();
        let fine = tokio::task::spawn_blocking(move || l.check_source().is_ok())
            .await
            .map_err(joined)?;
        Ok(fine.then_some(local))
    }

    /// The download of one of `tree`'s files (or its pack) to `dest`: the one under way, or a
    /// new one; `None` if the file was found whole at `dest` and adopted. Called through
    /// `one_start_at_a_time`: one start per content, whichever collections ask.
    pub(super) async fn member_download(
        self: &Arc<Self>,
        tree: &Arc<Tree>,
        manifest: Manifest,
        dest: &Path,
    ) -> Result<Option<Arc<download::Download>>, WireError> {
        let id = manifest.file_id();
        if let Some(dl) = self.download(&id) {
            if matches!(dl.state(), DownloadState::Paused | DownloadState::Failed(_)) {
                dl.start(self.context()).await;
            }
            return Ok(Some(dl));
        }
        // The partial file goes where no entry of the tree can be (a pack's, beside it in
        // this daemon's own directory).
        let part = if dest.starts_with(&tree.part) {
            tree.scratch().join(format!("{}.part", id.to_hex()))
        } else {
            let mut p = dest.as_os_str().to_owned();
            p.push(".part");
            PathBuf::from(p)
        };
        // Left by a crash before their records reached the disk: a partial file no record
        // names (ours: it is in our own directory), or the whole file in place.
        let _ = tokio::fs::remove_file(&part).await;
        if tokio::fs::symlink_metadata(dest).await.is_ok() {
            let (d, m) = (dest.to_path_buf(), manifest.clone());
            let found = tokio::task::spawn_blocking(move || adopt(&d, &m))
                .await
                .map_err(joined)??;
            if let Some(identity) = found {
                self.share_member(tree.id, dest, manifest, identity)?;
                return Ok(None);
            }
        }
        let dl = self
            .begin_download(manifest, dest.to_path_buf(), part, Some(tree.id))
            .await?;
        Ok(Some(dl))
    }

    /// Forgets the finished download of one of a collection's files: its share (recorded
    /// when it completed) is what lasts. A tree of thousands of files keeps no download
    /// state for the files already in.
    pub(super) fn retire(&self, dl: &download::Download) {
        if dl.state() != DownloadState::Complete || dl.local.collection().is_none() {
            return;
        }
        lock(&self.downloads).remove(&dl.id);
        crate::return_freed_memory();
        if let Err(e) = self.store.remove_download(&dl.id) {
            warn!(error = %e, "removing a finished download's record");
        }
    }

    /// Stops serving the tree's files while it is moved (their paths and modes change).
    fn hold_members(&self, tree: &Tree, collection: &Collection) {
        for e in &collection.entries {
            let Some(local) = e.file_id().and_then(|id| self.local_file(&id)) else {
                continue;
            };
            if local.path() == tree.part.join(e.path()) {
                local.set_problem(format!(
                    "{} is being moved into place",
                    tree.output.display()
                ));
            }
        }
    }

    /// Serves the tree's files from `base` (the tree in place, or still `part` if it could not
    /// be moved) with their identity as they are now; their downloads are done with (the
    /// records go, the shares stay).
    async fn relocate_members(&self, tree: &Tree, collection: &Collection, base: &Path) {
        // Which files are the tree's own here (a file held before, elsewhere, is served from
        // there; the tree has a copy).
        // Entries, not manifests: a copy of every file's hashes at once would be the peak of
        // a large set's memory. A manifest is built only for a file not known here yet.
        let mut moved = Vec::new();
        for e in &collection.entries {
            let Some(id) = e.file_id().filter(|_| e.size() > 0) else {
                continue;
            };
            let local = self.local_file(&id);
            let mine = [tree.part.join(e.path()), tree.output.join(e.path())];
            if local.as_ref().is_some_and(|l| !mine.contains(&l.path())) {
                continue;
            }
            moved.push((e, id, local, base.join(e.path())));
        }
        // Thousands of `stat`s: off the async threads.
        let paths: Vec<PathBuf> = moved.iter().map(|(.., p)| p.clone()).collect();
        let metas = tokio::task::spawn_blocking(move || {
            paths.iter().map(std::fs::metadata).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for ((e, id, local, new), meta) in moved.into_iter().zip(metas) {
            let identity = match meta {
                Ok(meta) => Identity::of(&meta),
                Err(e) => {
                    warn!(path = %new.display(), error = %e, "a collection's file cannot be read; not serving it");
                    continue;
                }
            };
            let local = match local {
                Some(local) => local,
                None => {
                    let Some(manifest) = e.manifest() else {
                        continue;
                    };
                    let l = Arc::new(LocalFile::closed(Arc::new(manifest), new.clone(), identity));
                    l.set_collection(Some(tree.id));
                    self.insert_file(l.clone());
                    l
                }
            };
            local.set_path(new.clone());
            local.set_source(identity);
            local.clear_problem();
            let Ok(path) = utf8(&new) else { continue };
            let mut record = ShareRecord::new((*local.manifest).clone(), path, identity);
            record.collection = local.collection();
            if let Err(e) = self.store.put_share(&id, &record) {
                warn!(error = %e, "recording a collection's file");
            }
            if base == tree.output && lock(&self.downloads).remove(&id).is_some() {
                if let Err(e) = self.store.remove_download(&id) {
                    warn!(error = %e, "removing a finished download's record");
                }
            }
        }
        if let Err(e) = self.store.flush().await {
            warn!(error = %e, "flushing a collection's files");
        }
        // Served again from their new paths (a peer that asked while they moved had the
        // tracker told they were gone).
        self.announce_members(&tree.id);
    }
}
