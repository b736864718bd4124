//! The pack: a collection's small files one after the other, fetched and served as one file
//! (a thousand small files cost one download, not a thousand). Each packed file keeps its
//! own entry and ID; cut from the pack, it is checked against its own hashes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use p2p_schema::{auto_chunk_size, Bitfield, Collection, ManifestBuilder, Pack};
use tokio_util::sync::CancellationToken;

use super::tree::{io, joined, Tree};
use super::*;
use crate::aligned::AlignedBuf;
use crate::local::Identity;
use crate::spans::Spans;

impl Node {
    /// Puts the tree's small files in place from its pack: those this daemon holds already
    /// at their place count as done; if any is missing, the pack is fetched (and kept, and
    /// served) and each file is cut from it as soon as the chunks it lies in have arrived,
    /// checked against its own hashes. Where each content went; `None` if stopped first.
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
        let Some((source, download)) = self.pack_source(tree, pack.manifest(), stop).await? else {
            return Ok(None);
        };
        let Some(cut) = self
            .cut_out_of(tree, source, download, missing, stop)
            .await?
        else {
            return Ok(None);
        };
        for (m, dest, identity) in cut {
            let id = m.file_id();
            tree.advance(|p| p.files_done += 1);
            self.share_member(tree.id, &dest, m, identity)?;
            placed.insert(id, dest);
        }
        Ok(Some(placed))
    }

    /// Cuts `missing` (path, manifest, offset) out of the pack at `source` into `tree`, each
    /// as soon as the chunks it lies in have arrived, while `download` (if any) fetches it: the
    /// files cut, durable, with their identities; `None` if stopped first.
    async fn cut_out_of(
        self: &Arc<Self>,
        tree: &Arc<Tree>,
        source: PackSource,
        download: Option<Arc<download::Download>>,
        missing: Vec<(String, Manifest, u64)>,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<(Manifest, PathBuf, Identity)>>, WireError> {
        let abort = Arc::new(AtomicBool::new(false));
        let all_in = source.all_in.clone();
        let part = tree.part.clone();
        let stopping = abort.clone();
        let mut cutter =
            tokio::task::spawn_blocking(move || unpack(&source, &part, &missing, &stopping));
        // Files are cut while the pack arrives; a cut that fails ends the tree at once.
        let arrived = || async {
            match &download {
                Some(dl) => self.wait_download(dl, stop, Some(tree)).await,
                None => {
                    stop.cancelled().await;
                    Ok(false)
                }
            }
        };
        let mut cut = None;
        let fetched = tokio::select! {
            f = arrived() => f,
            c = &mut cutter => {
                // Every file was cut, so every chunk was in: the download is ending.
                cut = Some(c.map_err(joined)??);
                match &download {
                    Some(dl) => self.wait_download(dl, stop, Some(tree)).await,
                    None => Ok(true),
                }
            }
        };
        if !matches!(fetched, Ok(true)) {
            abort.store(true, Ordering::Relaxed);
            if cut.is_none() {
                let _ = cutter.await;
            }
            return fetched.map(|_| None);
        }
        // Complete: whatever becomes of its record, every chunk is on disk.
        all_in.store(true, Ordering::Relaxed);
        if let Some(dl) = &download {
            self.retire(dl);
        }
        let cut = match cut {
            Some(cut) => cut,
            None => cutter.await.map_err(joined)??,
        };
        Ok(Some(cut))
    }

    /// Where `tree`'s pack (`manifest`) is read from to be cut: a copy held whole here, or
    /// its download (started, or the one under way), read as its chunks become durable.
    /// `None` if stopped first.
    async fn pack_source(
        self: &Arc<Self>,
        tree: &Arc<Tree>,
        manifest: Manifest,
        stop: &CancellationToken,
    ) -> Result<Option<(PackSource, Option<Arc<download::Download>>)>, WireError> {
        let id = manifest.file_id();
        let (size, chunk_size) = (manifest.size, manifest.chunk_size);
        let whole = |path: PathBuf| {
            tree.advance(|p| p.bytes_done += size);
            let file = open_pack(&path, None)?;
            let direct = crate::fileio::open_direct_read(&path);
            Ok(Some((
                PackSource {
                    file,
                    direct,
                    path,
                    chunk_size,
                    readable: None,
                    all_in: Arc::new(AtomicBool::new(true)),
                },
                None,
            )))
        };
        if let Some(local) = self.held_whole(&id).await? {
            return whole(local.path());
        }
        let path = self.pack_path(&id);
        let start = self.member_download(tree, manifest, &path);
        let Some(dl) = self.one_start_at_a_time(id, start).await? else {
            // Found whole in place (its records were lost in a crash) and adopted.
            return whole(path);
        };
        if stop.is_cancelled() {
            return Ok(None);
        }
        // Opened once: the rename that completes the download does not move what is read.
        let file = open_pack(&dl.part, Some(&dl.output))?;
        let direct = crate::fileio::open_direct_read(&dl.part)
            .or_else(|| crate::fileio::open_direct_read(&dl.output));
        let local = dl.local.clone();
        Ok(Some((
            PackSource {
                file,
                direct,
                path: dl.output.clone(),
                chunk_size,
                readable: Some(Box::new(move || local.have())),
                all_in: Arc::new(AtomicBool::new(false)),
            },
            Some(dl),
        )))
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
            // Freeing a large file's blocks takes a while (a quarter of a second for 1 GiB
            // here): not on the way of the tree's completion.
            tokio::task::spawn_blocking(move || std::fs::remove_file(path));
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

/// A pack as it is read to be cut: a copy held whole, or its download's file, from which
/// only chunks already durable are read.
pub(super) struct PackSource {
    /// The pack's bytes, read buffered where direct I/O is refused.
    file: std::fs::File,
    /// The same file with direct I/O, where allowed: read once, it need not pass through
    /// the page cache.
    direct: Option<std::fs::File>,
    /// For messages.
    path: PathBuf,
    chunk_size: u32,
    /// Which chunks can be read now (a download's durable ones); `None` for a copy held
    /// whole.
    readable: Option<Readable>,
    /// Set once the download is complete: every chunk can be read.
    all_in: Arc<AtomicBool>,
}

/// Tells which of a pack's chunks can be read now.
type Readable = Box<dyn Fn() -> Bitfield + Send + Sync>;

impl PackSource {
    fn readable(&self) -> Option<Bitfield> {
        if self.all_in.load(Ordering::Relaxed) {
            return None;
        }
        self.readable.as_ref().map(|r| r())
    }
}

/// Opens the pack at `path`, or at `then` if it is gone from there (its download completed
/// and renamed it).
fn open_pack(path: &Path, then: Option<&Path>) -> Result<std::fs::File, WireError> {
    match (std::fs::File::open(path), then) {
        (Err(e), Some(then)) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::File::open(then).map_err(io(format!("opening {}", then.display())))
        }
        (opened, _) => opened.map_err(io(format!("opening {}", path.display()))),
    }
}

/// Threads that read, check and write files cut from a pack. Direct writes wait for the
/// device, so more threads than cores keep it busy.
const CUTTERS: usize = 8;

/// How often the cutting looks again for files whose chunks have all arrived.
const READY_POLL: Duration = Duration::from_millis(20);

/// Cuts each of `files` (path, manifest, offset) out of the pack into its place under `part`
/// (blocking), each as soon as the chunks it lies in are durable, checking it against its own
/// hashes: a pack that does not hold what the index says fails the download. Every file is
/// durable when this returns; with its identity. Returns early (what was cut so far) once
/// `abort` is set.
pub(super) fn unpack(
    source: &PackSource,
    part: &Path,
    files: &[(String, Manifest, u64)],
    abort: &AtomicBool,
) -> Result<Vec<(Manifest, PathBuf, Identity)>, WireError> {
    // This thread hands out each file once its chunks are in; two read, check and write them
    // (hashing and writing are the bound, and two cores are the least a machine has).
    let (tx, rx) = std::sync::mpsc::sync_channel::<usize>(64);
    // Shared by the workers only: once both have ended (even by a panic) it is dropped, and
    // the next send fails instead of waiting for ever.
    let rx = Arc::new(Mutex::new(rx));
    let failed = AtomicBool::new(false);
    let written: Vec<(PathBuf, Manifest, Identity)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..CUTTERS)
            .map(|_| {
                let (rx, failed) = (rx.clone(), &failed);
                scope.spawn(move || cut_out(source, &rx, part, files, failed, abort))
            })
            .collect();
        drop(rx);
        hand_out(source, files, tx, &failed, abort);
        let mut all = Vec::with_capacity(files.len());
        for w in workers {
            let cut = w
                .join()
                .map_err(|_| err(ErrorCode::Internal, "unpacking failed"))??;
            all.extend(cut);
        }
        Ok::<_, WireError>(all)
    })?;
    tracing::debug!(files = files.len(), "cut from the pack");
    // One sync for them all where the platform can (the writes went out meanwhile), else
    // each file's and each directory's.
    sync_all_of(part, written.iter().map(|(dest, ..)| dest.as_path()))
        .map_err(io(format!("syncing files in {}", part.display())))?;
    tracing::debug!("files cut from the pack synced");
    Ok(written
        .into_iter()
        .map(|(dest, m, identity)| (m, dest, identity))
        .collect())
}

/// Sends each of `files` (in any order) once every chunk it lies in is readable, until all
/// are sent, the workers are gone, or `failed` or `abort` is set.
fn hand_out(
    source: &PackSource,
    files: &[(String, Manifest, u64)],
    tx: std::sync::mpsc::SyncSender<usize>,
    failed: &AtomicBool,
    abort: &AtomicBool,
) {
    let mut pending: Vec<usize> = (0..files.len()).collect();
    pending.sort_by_key(|&i| files[i].2);
    let chunk = u64::from(source.chunk_size.max(1));
    loop {
        let readable = source.readable();
        let mut rest = Vec::new();
        for i in pending {
            if failed.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed) {
                return;
            }
            let (_, m, offset) = &files[i];
            let ready = readable.as_ref().is_none_or(|have| {
                let last = (offset + m.size.max(1) - 1) / chunk;
                (offset / chunk..=last).all(|c| u32::try_from(c).is_ok_and(|c| have.get(c)))
            });
            if !ready {
                rest.push(i);
            } else if tx.send(i).is_err() {
                return;
            }
        }
        pending = rest;
        if pending.is_empty() {
            return;
        }
        std::thread::sleep(READY_POLL);
    }
}

/// Takes files (an index into `files`) from `rx`, and cuts each out of the pack into its
/// place under `part` (blocking): their paths, manifests and identities. After a failure
/// (this worker's or another's, in `failed`) or once `abort` is set, what comes is taken and
/// dropped until the hand-out stops.
fn cut_out(
    source: &PackSource,
    rx: &Mutex<std::sync::mpsc::Receiver<usize>>,
    part: &Path,
    files: &[(String, Manifest, u64)],
    failed: &AtomicBool,
    abort: &AtomicBool,
) -> Result<Vec<(PathBuf, Manifest, Identity)>, WireError> {
    let mut written = Ok(Vec::new());
    let (mut block, mut staging) = (AlignedBuf::new(), AlignedBuf::new());
    let mut direct = source.direct.as_ref();
    loop {
        let next = lock(rx).recv();
        let Ok(i) = next else {
            return written;
        };
        let Ok(done) = &mut written else { continue };
        if failed.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed) {
            continue;
        }
        match cut_one(
            source,
            &mut direct,
            &mut block,
            &mut staging,
            part,
            &files[i],
        ) {
            Ok(w) => done.push(w),
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                written = Err(e);
            }
        }
    }
}

/// Reads one file out of the pack (in `block`, with direct I/O while `direct` is some),
/// checks it, and writes it at its place under `part`.
fn cut_one(
    source: &PackSource,
    direct: &mut Option<&std::fs::File>,
    block: &mut AlignedBuf,
    staging: &mut AlignedBuf,
    part: &Path,
    (path, m, offset): &(String, Manifest, u64),
) -> Result<(PathBuf, Manifest, Identity), WireError> {
    use crate::aligned::ALIGN;
    use crate::fileio::read_up_to_at;
    let size = usize::try_from(m.size).map_err(|_| {
        err(
            ErrorCode::BadRequest,
            format!("{path} is too large to pack"),
        )
    })?;
    // The aligned stretch of the pack around the file, which direct I/O requires.
    let start = offset - offset % ALIGN as u64;
    let skip = (offset - start) as usize;
    block.resize((skip + size).next_multiple_of(ALIGN));
    let what = || format!("reading {}", source.path.display());
    let read = match direct.map(|d| read_up_to_at(d, block, start)) {
        Some(Ok(n)) => n,
        // Buffered where direct I/O is refused.
        Some(Err(_)) | None => {
            *direct = None;
            read_up_to_at(&source.file, block, start).map_err(io(what()))?
        }
    };
    if read < skip + size {
        return Err(err(
            ErrorCode::BadRequest,
            format!("the collection's pack ends before {path}"),
        ));
    }
    let bytes = &block[skip..skip + size];
    if !holds(bytes, m) {
        return Err(err(
            ErrorCode::BadRequest,
            format!("the collection's pack does not hold {path} as its index says"),
        ));
    }
    // Written at its place: the tree is this download's own until it is renamed, and a file
    // left there by a crash before its record is simply written again.
    let dest = part.join(path);
    let meta = crate::fileio::write_whole(&dest, bytes, staging)
        .map_err(io(format!("writing {}", dest.display())))?;
    Ok((dest, m.clone(), Identity::of(&meta)))
}

/// Whether `bytes` are exactly the file `m` names (hashed in its chunks).
fn holds(bytes: &[u8], m: &Manifest) -> bool {
    let mut b = ManifestBuilder::new(m.chunk_size);
    b.update(bytes);
    b.finish(String::new()).file_id() == m.file_id()
}

/// Makes `files` (all under `dir`) and their directory entries durable: one `syncfs` on
/// Linux, else each file's sync and each directory's.
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
    let mut dirs = HashSet::new();
    for f in files {
        std::fs::File::open(f)?.sync_all()?;
        if f.parent().is_some_and(|p| dirs.insert(p.to_path_buf())) {
            crate::part::sync_parent(f);
        }
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

    /// Files named and holding `contents`, one after the other in a pack under `dir`, and
    /// an empty tree to cut them into: the pack's path, the tree's, and the files (path,
    /// manifest, offset).
    fn packed(
        dir: &Path,
        contents: &[(&str, &[u8])],
    ) -> (PathBuf, PathBuf, Vec<(String, Manifest, u64)>) {
        let pack = dir.join("pack");
        let bytes: Vec<u8> = contents
            .iter()
            .flat_map(|(_, b)| b.iter().copied())
            .collect();
        std::fs::write(&pack, bytes).unwrap();
        let part = dir.join("tree");
        std::fs::create_dir_all(&part).unwrap();
        let mut offset = 0;
        let files = contents
            .iter()
            .map(|(name, b)| {
                offset += b.len() as u64;
                (name.to_string(), manifest_of(b), offset - b.len() as u64)
            })
            .collect();
        (pack, part, files)
    }

    /// The pack at `path`, in chunks of 1 KiB; `readable` as given.
    fn source(path: &Path, readable: Option<Readable>) -> PackSource {
        PackSource {
            file: std::fs::File::open(path).unwrap(),
            direct: crate::fileio::open_direct_read(path),
            path: path.to_path_buf(),
            chunk_size: 1024,
            readable,
            all_in: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn files_are_cut_from_a_pack_only_if_they_are_what_the_index_says() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (vec![1u8; 3000], vec![2u8; 500]);
        let (pack, part, files) = packed(dir.path(), &[("a", &a), ("b", &b)]);
        let no = AtomicBool::new(false);
        let cut = unpack(&source(&pack, None), &part, &files, &no).unwrap();
        assert_eq!(cut.len(), 2);
        assert_eq!(std::fs::read(part.join("a")).unwrap(), a);
        assert_eq!(std::fs::read(part.join("b")).unwrap(), b);

        // A pack whose bytes differ from what the index says of a file: refused, and that
        // file is not written.
        std::fs::write(&pack, [a.clone(), vec![3u8; 500]].concat()).unwrap();
        let fresh = dir.path().join("fresh");
        std::fs::create_dir_all(&fresh).unwrap();
        let e = unpack(&source(&pack, None), &fresh, &files, &no).unwrap_err();
        assert!(e.message.contains("does not hold b"), "{e}");
        assert!(!fresh.join("b").exists());
    }

    /// Waits (up to 10 s) for `path` to hold `bytes`.
    fn appears(path: &Path, bytes: &[u8]) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if std::fs::read(path).is_ok_and(|b| b == bytes) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn a_file_is_cut_once_every_chunk_it_lies_in_is_readable_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        // In chunks of 1 KiB: a in 0-2, b in 2-3, c in 3-4.
        let (a, b, c) = (vec![1u8; 3000], vec![2u8; 500], vec![3u8; 1000]);
        let (pack, part, files) = packed(dir.path(), &[("a", &a), ("b", &b), ("c", &c)]);
        let have = Arc::new(Mutex::new(Bitfield::new(5)));
        for i in [0, 1, 2, 4] {
            lock(&have).set(i);
        }
        let h = have.clone();
        let src = source(&pack, Some(Box::new(move || lock(&h).clone())));
        let no = AtomicBool::new(false);
        std::thread::scope(|s| {
            let cutting = s.spawn(|| unpack(&src, &part, &files, &no));
            assert!(appears(&part.join("a"), &a), "a's chunks are all in");
            // Several rounds of looking, with chunk 3 still missing.
            std::thread::sleep(READY_POLL * 5);
            assert!(!part.join("b").exists() && !part.join("c").exists());
            assert!(!cutting.is_finished());
            lock(&have).set(3);
            let cut = cutting.join().unwrap().unwrap();
            assert_eq!(cut.len(), 3);
        });
        assert_eq!(std::fs::read(part.join("b")).unwrap(), b);
        assert_eq!(std::fs::read(part.join("c")).unwrap(), c);
    }

    #[test]
    fn cutting_stops_when_told_though_chunks_are_missing() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (vec![1u8; 1024], vec![2u8; 1024]);
        let (pack, part, files) = packed(dir.path(), &[("a", &a), ("b", &b)]);
        let mut have = Bitfield::new(2);
        have.set(0);
        let src = source(&pack, Some(Box::new(move || have.clone())));
        let abort = AtomicBool::new(false);
        std::thread::scope(|s| {
            let cutting = s.spawn(|| unpack(&src, &part, &files, &abort));
            assert!(appears(&part.join("a"), &a));
            abort.store(true, Ordering::Relaxed);
            let cut = cutting.join().unwrap().unwrap();
            assert_eq!(cut.len(), 1, "only a was readable");
        });
        assert!(!part.join("b").exists());
    }
}
