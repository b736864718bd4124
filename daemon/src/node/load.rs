//! Bringing back what an earlier run shared and downloaded, re-verifying what a crash left
//! in doubt.

use super::*;

impl Node {
    /// Brings back shares and downloads recorded by an earlier run. After an unclean stop
    /// (`clean` false), chunks written but not yet recorded are re-verified from disk.
    pub(crate) async fn load(self: &Arc<Self>, clean: bool) {
        for (id, rec) in self.store.shares() {
            self.load_share(id, rec);
        }
        for (id, rec) in self.store.downloads() {
            self.load_download(id, rec, clean).await;
        }
        for (_, rec) in self.store.collections() {
            self.load_tree(rec).await;
        }
    }

    /// Serves a recorded share again, without re-hashing if it is unchanged.
    fn load_share(&self, id: FileId, rec: ShareRecord) {
        let identity = rec.identity();
        let path = PathBuf::from(&rec.path);
        // Not opened until a chunk is read: a daemon sharing thousands of files starts at
        // once, with a few descriptors. Checked against its identity (a `stat`), not re-hashed.
        let local = LocalFile::closed(Arc::new(rec.manifest), path, identity);
        local.set_collection(rec.collection);
        match local.check_source() {
            // A collection's files are many: one line for each at debug level only.
            Ok(()) if rec.collection.is_some() => {
                tracing::debug!(file = %id.short(), path = %rec.path, "share restored without re-hashing")
            }
            Ok(()) => {
                info!(file = %id.short(), path = %rec.path, "share restored without re-hashing")
            }
            Err(why) => warn!(file = %id.short(), "{why}; not serving it"),
        }
        self.insert_file(Arc::new(local));
    }

    /// Brings back a recorded download: resumes it if it was running.
    async fn load_download(self: &Arc<Self>, id: FileId, rec: DownloadRecord, clean: bool) {
        let manifest = Arc::new(rec.manifest.clone());
        let (output, part) = (PathBuf::from(&rec.output), PathBuf::from(&rec.part));
        if rec.state == DownloadState::Complete {
            if let Some(local) = self.local_file(&id) {
                let dl = Download::new(manifest, local, output, part, rec.state, rec.refetched);
                lock(&self.downloads).insert(id, Arc::new(dl));
            }
            return;
        }
        let Some(file) = self
            .reopen_part(&manifest, &output, &part, rec.collection)
            .await
        else {
            return;
        };
        let mut have = self.store.held_chunks(&id, manifest.chunk_count());
        let mut refetched = rec.refetched;
        if !clean && rec.state == DownloadState::Running {
            refetched += self.take_in_recovered(&rec, &file, &mut have).await;
        }
        let local = Arc::new(LocalFile::new(manifest.clone(), file, part.clone(), have));
        local.set_collection(rec.collection);
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
            lock(&self.downloads).insert(id, dl);
        }
    }

    /// The partial file of a recorded download, reopened; or made anew if it is gone (unless
    /// the download finished just before the daemon stopped: then it is recorded complete
    /// and `None` returned, as when it cannot be reopened).
    async fn reopen_part(
        &self,
        manifest: &Arc<Manifest>,
        output: &Path,
        part: &Path,
        collection: Option<FileId>,
    ) -> Option<std::fs::File> {
        let id = manifest.file_id();
        match open_part(part) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Stopped between the final rename and recording it complete?
                if self
                    .adopt_finished(manifest, output, part, collection)
                    .await
                {
                    return None;
                }
                warn!(file = %id.short(), part = %part.display(), "partial file is gone; the download starts over");
                let _ = self.store.clear_chunks(&id);
                match create_part(part, manifest.size) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        warn!(file = %id.short(), error = %part_error(part, output, e), "cannot restart a download");
                        None
                    }
                }
            }
            Err(e) => {
                warn!(file = %id.short(), part = %part.display(), error = %e, "cannot reopen a partial file; not resuming it");
                None
            }
        }
    }

    /// After an unclean stop: re-verifies what reached the partial file unrecorded, adds the
    /// good chunks to `have`, and returns the bytes torn (to be fetched again; persisted).
    async fn take_in_recovered(
        &self,
        rec: &DownloadRecord,
        file: &std::fs::File,
        have: &mut Bitfield,
    ) -> u64 {
        let manifest = Arc::new(rec.manifest.clone());
        let id = manifest.file_id();
        let found = match self.recover(&id, &manifest, file, have).await {
            Ok(found) => found,
            Err(e) => {
                warn!(file = %id.short(), error = %e, "re-verifying the partial file");
                return 0;
            }
        };
        for &i in &found.good {
            have.set(i);
        }
        let torn: u64 = found
            .torn
            .iter()
            .filter_map(|&i| manifest.chunk_range(i))
            .map(|(_, len)| u64::from(len))
            .sum();
        if torn > 0 {
            let updated = DownloadRecord {
                refetched: rec.refetched + torn,
                ..rec.clone()
            };
            if let Err(e) = self.store.put_download(&id, &updated) {
                warn!(error = %e, "saving download state");
            }
        }
        torn
    }

    /// Recognises a download that was renamed into place but not recorded complete (the daemon
    /// stopped in between): its partial file is gone and its output holds exactly the bytes
    /// its manifest names (every chunk re-verified). Then it is recorded complete and shared,
    /// as the finished download would have been. Returns whether it was.
    async fn adopt_finished(
        &self,
        manifest: &Arc<Manifest>,
        output: &Path,
        part: &Path,
        collection: Option<FileId>,
    ) -> bool {
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
        let mut share = ShareRecord::new((**manifest).clone(), path.to_string(), identity);
        share.collection = collection;
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
        local.set_collection(collection);
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
