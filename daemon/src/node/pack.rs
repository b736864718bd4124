//! The pack: a collection's small files one after the other, fetched and served as one file
//! (a thousand small files cost one download, not a thousand). Each packed file keeps its
//! own entry and ID; cut from the pack, it is checked against its own hashes.

use std::collections::HashSet;

use p2p_schema::{auto_chunk_size, Collection, ManifestBuilder, Pack};
use tokio_util::sync::CancellationToken;

use super::tree::{io, joined, Tree, SCRATCH};
use super::*;
use crate::local::Identity;
use crate::spans::Spans;

impl Node {
    /// Puts the tree's small files in place from its pack: those this daemon holds already
    /// at their place count as done; if any is missing, the pack is fetched (and kept, and
    /// served) and each file is cut from it and checked against its own hashes. Where each
    /// content went; `None` if stopped first.
    pub(super) async fn fetch_pack(
        self: &Arc<Self>,
        tree: &Arc<Tree>,
        collection: &Arc<Collection>,
        stop: &CancellationToken,
    ) -> Result<Option<HashMap<FileId, PathBuf>>, WireError> {
        let mut placed = HashMap::new();
        let Some(pack) = &collection.pack else {
            return Ok(Some(placed));
        };
        let mut missing = Vec::new();
        for (e, offset) in collection.packed() {
            let Some(m) = e.manifest() else { continue };
            let dest = tree.part.join(e.path());
            let held = self
                .local_file(&m.file_id())
                .filter(|f| f.is_complete() && f.problem().is_none());
            match held {
                Some(local) if local.path() == dest => {
                    tree.advance(|p| {
                        p.files_done += 1;
                        p.bytes_done += m.size;
                    });
                    placed.insert(m.file_id(), dest);
                }
                // Held elsewhere here, and the pack too, served from its files (another copy
                // of this tree): copied (see `fetch_member`); the pack cannot be fetched from
                // this daemon itself. Otherwise each is cut from the pack and checked.
                Some(local) if local.spans().is_none() && self.serves_packed(pack) => {
                    if !self.fetch_member(tree, m.clone(), &dest, 1, stop).await? {
                        return Ok(None);
                    }
                    placed.insert(m.file_id(), dest);
                }
                _ => missing.push((e.path().to_string(), m, offset)),
            }
        }
        if missing.is_empty() {
            return Ok(Some(placed));
        }
        let manifest = pack.manifest();
        let path = self.pack_path(&manifest.file_id());
        if !self.fetch_member(tree, manifest, &path, 0, stop).await? {
            return Ok(None);
        }
        let part = tree.part.clone();
        let cut = tokio::task::spawn_blocking(move || unpack(&path, &part, &missing))
            .await
            .map_err(joined)??;
        for (m, dest, identity) in cut {
            let id = m.file_id();
            tree.advance(|p| p.files_done += 1);
            self.share_member(tree.id, &dest, m, identity)?;
            placed.insert(id, dest);
        }
        Ok(Some(placed))
    }

    /// Whether `pack` is served here from the files it packs.
    fn serves_packed(&self, pack: &Pack) -> bool {
        self.local_file(&pack.manifest().file_id())
            .is_some_and(|f| f.spans().is_some())
    }

    /// Serves the pack of `collection` (held whole, under `root`) from the files it packs;
    /// a copy of the pack fetched to build the tree is then forgotten and deleted.
    pub(super) fn serve_pack(&self, cid: FileId, collection: &Collection, root: &Path) {
        let Some(pack) = &collection.pack else {
            return;
        };
        let manifest = pack.manifest();
        let id = manifest.file_id();
        let fetched = match self.local_file(&id) {
            // Served from another collection's files already (unless that failed: then
            // served from these), or being fetched for another.
            Some(f) if (f.spans().is_some() && f.problem().is_none()) || !f.is_complete() => return,
            Some(f) => Some(f.path()).filter(|p| *p == self.pack_path(&id)),
            None => None,
        };
        let spans = Spans::new(
            collection
                .packed()
                .into_iter()
                .filter_map(|(e, _)| e.manifest().map(|m| (m.file_id(), m.size))),
        );
        let local = LocalFile::packed(Arc::new(manifest), root.to_path_buf(), Arc::new(spans));
        local.set_collection(Some(cid));
        self.insert_file(Arc::new(local));
        if let Some(path) = fetched {
            if let Err(e) = self.store.remove_share(&id) {
                warn!(error = %e, "forgetting a pack served from its files now");
            }
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Makes a collection's pack from its small files as they are hashed, from the bytes hashed
/// (each file is read once): on a thread of its own, which hashes the pack's chunks beside
/// the hashing of the files. Nothing is written: the pack is served from the files.
pub(super) struct PackHasher {
    files: Vec<String>,
    bytes: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    hasher: std::thread::JoinHandle<Manifest>,
}

impl PackHasher {
    /// A pack of files expected to come to about `total` bytes (its chunk size follows from
    /// it).
    pub(super) fn start(total: u64) -> PackHasher {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
        let hasher = std::thread::spawn(move || {
            let mut builder = ManifestBuilder::new(auto_chunk_size(total));
            for bytes in rx {
                builder.update(&bytes);
            }
            builder.finish("pack".into())
        });
        PackHasher {
            files: Vec::new(),
            bytes: Some(tx),
            hasher,
        }
    }

    /// Appends the file at `path` in the collection, whose bytes are `bytes`.
    pub(super) fn add(&mut self, path: &str, bytes: Vec<u8>) {
        self.files.push(path.to_string());
        if let Some(tx) = &self.bytes {
            // Refused only if the hasher is gone (it panicked), which `finish` reports.
            if tx.send(bytes).is_err() {
                self.bytes = None;
            }
        }
    }

    /// The pack; `None` if fewer than two files went in, as a collection packs only two or
    /// more.
    pub(super) fn finish(mut self) -> Result<Option<Pack>, WireError> {
        self.bytes = None;
        let manifest = self
            .hasher
            .join()
            .map_err(|_| err(ErrorCode::Internal, "hashing the pack failed"))?;
        Ok((self.files.len() >= 2).then_some(Pack {
            files: self.files,
            size: manifest.size,
            chunk_size: manifest.chunk_size,
            hashes: manifest.hashes,
        }))
    }
}

/// Cuts each of `files` (path, manifest, offset) out of the pack at `pack` into `part`
/// (blocking), checking it against its own hashes: a pack that does not hold what the index
/// says fails the download. Every file is durable when this returns; with its identity.
pub(super) fn unpack(
    pack: &Path,
    part: &Path,
    files: &[(String, Manifest, u64)],
) -> Result<Vec<(Manifest, PathBuf, Identity)>, WireError> {
    // One thread reads the pack front to back, handing out each file's bytes; two check and
    // write them (hashing is the bound, and two cores are the least a machine has).
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(32);
    // Shared by the workers only: once both have ended (even by a panic) it is dropped, and
    // the reader's next send fails instead of waiting for ever.
    let rx = Arc::new(Mutex::new(rx));
    let failed = std::sync::atomic::AtomicBool::new(false);
    let written: Vec<(PathBuf, PathBuf, Manifest)> = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_files(pack, files, tx, &failed));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (rx, failed) = (rx.clone(), &failed);
                scope.spawn(move || cut_out(&rx, part, files, failed))
            })
            .collect();
        drop(rx);
        let mut all = Vec::with_capacity(files.len());
        for w in workers {
            let cut = w
                .join()
                .map_err(|_| err(ErrorCode::Internal, "unpacking failed"))??;
            all.extend(cut);
        }
        reader
            .join()
            .map_err(|_| err(ErrorCode::Internal, "unpacking failed"))??;
        Ok::<_, WireError>(all)
    })?;
    let mut out = Vec::with_capacity(files.len());
    // One sync for them all where the platform can (the writes went out meanwhile), else
    // one per file; then each is renamed into place, and the renames made durable.
    sync_all_of(part, written.iter().map(|(temp, ..)| temp.as_path()))
        .map_err(io(format!("syncing files in {}", part.display())))?;
    let mut dirs = HashSet::new();
    for (temp, dest, m) in written {
        std::fs::rename(&temp, &dest).map_err(io(format!("renaming {}", temp.display())))?;
        let meta = std::fs::metadata(&dest).map_err(io(format!("reading {}", dest.display())))?;
        if dirs.insert(dest.parent().map(Path::to_path_buf)) {
            crate::part::sync_parent(&dest);
        }
        out.push((m, dest, Identity::of(&meta)));
    }
    Ok(out)
}

/// Whether `bytes` are exactly the file `m` names (hashed in its chunks).
fn holds(bytes: &[u8], m: &Manifest) -> bool {
    let mut b = ManifestBuilder::new(m.chunk_size);
    b.update(bytes);
    b.finish(String::new()).file_id() == m.file_id()
}

/// Bytes of the pack read at once.
const UNPACK_BLOCK: usize = 4 << 20;

/// Reads the pack front to back in large aligned blocks (direct I/O where the file system
/// allows: read once, it need not pass through the page cache) and sends each of `files`
/// (in pack order) with its bytes, until done, the receivers are gone or `failed` is set.
fn read_files(
    pack: &Path,
    files: &[(String, Manifest, u64)],
    tx: std::sync::mpsc::SyncSender<(usize, Vec<u8>)>,
    failed: &std::sync::atomic::AtomicBool,
) -> Result<(), WireError> {
    let what = || format!("reading {}", pack.display());
    let source = std::fs::File::open(pack).map_err(io(what()))?;
    let mut direct = crate::fileio::open_direct_read(pack);
    let mut block = crate::aligned::AlignedBuf::new();
    block.resize(UNPACK_BLOCK);
    // The bytes of the pack in `block`: from `start`, `len` of them.
    let (mut start, mut len) = (0u64, 0usize);
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_key(|&i| files[i].2);
    for i in order {
        let (path, m, offset) = &files[i];
        let size = usize::try_from(m.size).unwrap_or(usize::MAX);
        let mut bytes = Vec::with_capacity(size);
        while bytes.len() < size {
            let at = offset + bytes.len() as u64;
            if at < start || at >= start + len as u64 {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(());
                }
                start = at - at % crate::aligned::ALIGN as u64;
                len = match direct
                    .as_ref()
                    .map(|d| crate::fileio::read_up_to_at(d, &mut block, start))
                {
                    Some(Ok(n)) => n,
                    // Buffered where direct I/O is refused.
                    Some(Err(_)) | None => {
                        direct = None;
                        crate::fileio::read_up_to_at(&source, &mut block, start)
                            .map_err(io(what()))?
                    }
                };
                if at >= start + len as u64 {
                    return Err(err(
                        ErrorCode::BadRequest,
                        format!("the collection's pack ends before {path}"),
                    ));
                }
            }
            let from = (at - start) as usize;
            let n = (size - bytes.len()).min(len - from);
            bytes.extend_from_slice(&block[from..from + n]);
        }
        if tx.send((i, bytes)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Takes files (an index into `files` and its bytes) from `rx` and writes each into `part`
/// under a temporary name, once checked against its own hashes (blocking): temporary and
/// final paths, and manifests. After a failure (this worker's or another's, in `failed`),
/// what comes is taken and dropped until the reader stops.
fn cut_out(
    rx: &Mutex<std::sync::mpsc::Receiver<(usize, Vec<u8>)>>,
    part: &Path,
    files: &[(String, Manifest, u64)],
    failed: &std::sync::atomic::AtomicBool,
) -> Result<Vec<(PathBuf, PathBuf, Manifest)>, WireError> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut written = Ok(Vec::new());
    loop {
        let next = lock(rx).recv();
        let Ok((i, bytes)) = next else {
            return written;
        };
        let Ok(done) = &mut written else { continue };
        if failed.load(Relaxed) {
            continue;
        }
        match write_one(part, &files[i], &bytes) {
            Ok(w) => done.push(w),
            Err(e) => {
                failed.store(true, Relaxed);
                written = Err(e);
            }
        }
    }
}

/// Writes one file cut from the pack under a temporary name, once checked.
fn write_one(
    part: &Path,
    (path, m, _): &(String, Manifest, u64),
    bytes: &[u8],
) -> Result<(PathBuf, PathBuf, Manifest), WireError> {
    if !holds(bytes, m) {
        return Err(err(
            ErrorCode::BadRequest,
            format!("the collection's pack does not hold {path} as its index says"),
        ));
    }
    let dest = part.join(path);
    // Where no entry of the tree can be (see `SCRATCH`).
    let temp = part
        .join(SCRATCH)
        .join(format!("{}.unpack", fastrand::u64(..)));
    // Closed at once: a pack may hold more files than this process may open.
    std::fs::write(&temp, bytes).map_err(io(format!("writing {}", temp.display())))?;
    Ok((temp, dest, m.clone()))
}

/// Makes `files` (all under `dir`) durable: one `syncfs` on Linux, else each file's sync.
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
fn sync_all_of<'a>(dir: &Path, files: impl Iterator<Item = &'a Path>) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if let Ok(d) = std::fs::File::open(dir) {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs takes an open descriptor, which `d` is until it is dropped.
        if unsafe { libc::syncfs(d.as_raw_fd()) } == 0 {
            return Ok(());
        }
    }
    for f in files {
        std::fs::File::open(f)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_of(data: &[u8]) -> Manifest {
        let mut b = ManifestBuilder::new(1024);
        b.update(data);
        b.finish("x".into())
    }

    #[test]
    fn files_are_cut_from_a_pack_only_if_they_are_what_the_index_says() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (vec![1u8; 3000], vec![2u8; 500]);
        let pack = dir.path().join("pack");
        std::fs::write(&pack, [a.clone(), b.clone()].concat()).unwrap();
        let part = dir.path().join("tree");
        std::fs::create_dir_all(part.join(SCRATCH)).unwrap();
        let files = vec![
            ("a".to_string(), manifest_of(&a), 0),
            ("b".to_string(), manifest_of(&b), 3000),
        ];
        let cut = unpack(&pack, &part, &files).unwrap();
        assert_eq!(cut.len(), 2);
        assert_eq!(std::fs::read(part.join("a")).unwrap(), a);
        assert_eq!(std::fs::read(part.join("b")).unwrap(), b);

        // A pack whose bytes differ from what the index says of a file: refused, and that
        // file is not written.
        std::fs::write(&pack, [a.clone(), vec![3u8; 500]].concat()).unwrap();
        let fresh = dir.path().join("fresh");
        std::fs::create_dir_all(fresh.join(SCRATCH)).unwrap();
        let e = unpack(&pack, &fresh, &files).unwrap_err();
        assert!(e.message.contains("does not hold b"), "{e}");
        assert!(!fresh.join("b").exists());
    }
}
