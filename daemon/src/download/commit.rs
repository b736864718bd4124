//! Making a download durable: the committer (written chunks, in batches) and the finish
//! (the complete file renamed into place and recorded as a share).

use super::*;

/// Makes written chunks durable in batches: sync the file, then record in sled, then serve
/// and announce. A chunk is never recorded before its bytes are on disk. Closed (`close`)
/// once every worker has ended: what was written so far is committed before the task ends.
/// Returns false if a commit failed.
pub(super) async fn commit_loop(
    swarm: Arc<Swarm>,
    mut rx: mpsc::UnboundedReceiver<u32>,
    close: CancellationToken,
) -> bool {
    loop {
        let mut batch = Vec::new();
        let stopping = tokio::select! {
            first = rx.recv() => match first {
                Some(i) => {
                    batch.push(i);
                    false
                }
                None => return true,
            },
            () = close.cancelled() => true,
        };
        let deadline = tokio::time::Instant::now() + COMMIT_INTERVAL;
        let chunks = swarm.dl.manifest.chunk_count() as usize;
        // The last chunks are committed at once: the download is done when they are.
        while !stopping
            && batch.len() < 4096
            && swarm.dl.local.have_count() as usize + batch.len() < chunks
        {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(i)) => batch.push(i),
                Ok(None) | Err(_) => break,
            }
        }
        while let Ok(i) = rx.try_recv() {
            batch.push(i);
        }
        if !batch.is_empty() && commit(&swarm, batch).await.is_err() {
            return false;
        }
        if stopping {
            return true;
        }
    }
}

pub(super) async fn commit(swarm: &Swarm, batch: Vec<u32>) -> Result<(), ()> {
    let (dl, node) = (&swarm.dl, &swarm.node);
    let file = dl.local.handle();
    // 1. The bytes reach the disk.
    let synced = tokio::task::spawn_blocking(move || file.and_then(|f| f.sync_data())).await;
    if let Err(e) = synced.map_err(std::io::Error::other).and_then(|r| r) {
        warn!(error = %e, "syncing {}", dl.part.display());
        return Err(());
    }
    // 2. Only then are they recorded as held.
    if let Err(e) = node.store.record_chunks(&dl.id, &batch) {
        warn!(error = %e, "recording chunks");
        return Err(());
    }
    // 3. Only then are they served and announced.
    dl.local.add(&batch);
    // A collection's member reaches its peers by pushes; the tracker knows only the collection.
    if dl.local.collection().is_none() {
        node.tracker.notify(TrackerRequest::Gained {
            file_id: dl.id,
            indices: batch,
        });
    }
    if dl.local.is_complete() {
        swarm.progress.notify_one();
    }
    Ok(())
}

/// Renames the complete file into place and turns it into a share.
pub(super) async fn finish(node: &Arc<Context>, dl: &Arc<Download>) -> Result<(), DownloadError> {
    let (part, output) = (dl.part.clone(), dl.output.clone());
    let file = dl.local.handle();
    let io = |what: String| move |source| DownloadError::Io { what, source };
    let meta = tokio::task::spawn_blocking(move || -> Result<std::fs::Metadata, DownloadError> {
        file.and_then(|f| f.sync_all())
            .map_err(io(format!("syncing {}", part.display())))?;
        crate::part::place(&part, &output).map_err(|e| match e {
            crate::part::PlaceError::Appeared => DownloadError::Appeared {
                output: output.clone(),
                part: part.clone(),
            },
            crate::part::PlaceError::Io(e) => io(format!(
                "renaming {} to {}",
                part.display(),
                output.display()
            ))(e),
        })?;

        std::fs::metadata(&output).map_err(io(format!("reading {}", output.display())))
    })
    .await
    .map_err(|e| DownloadError::Internal(e.to_string()))??;
    // Every worker and chunk write of this download has ended (see `drive`): nothing of ours
    // touches the file from here, so this identity is the one it keeps.
    let identity = Identity::of(&meta);
    dl.local.set_path(dl.output.clone());
    dl.local.set_source(identity);
    // Nothing writes it any more: its descriptors need not stay open.
    lock(&dl.direct).take();
    dl.local.make_evictable();
    let mut share = ShareRecord::new(
        (*dl.manifest).clone(),
        dl.output.to_string_lossy().into_owned(),
        identity,
    );
    share.collection = dl.local.collection();
    node.store.put_share(&dl.id, &share)?;
    dl.set_state(node, DownloadState::Complete);
    node.store.clear_chunks(&dl.id)?;
    // A collection's file is flushed with the collection (and sled flushes every 500 ms):
    // a crash before then finds the file complete in place and re-verifies it.
    if share.collection.is_none() {
        if let Err(e) = node.store.flush().await {
            warn!(error = %e, "flushing state after a download");
        }
    }
    if let Some(register) = crate::node::registration(&dl.local) {
        node.tracker.notify(register);
    }
    let peers = lock(&dl.sources).len() as u32;
    info!(
        output = %dl.output.display(),
        peers,
        "{} has completed downloading.",
        dl.manifest.name
    );
    let _ = dl.events.send(Event::Completed { peers });
    Ok(())
}
