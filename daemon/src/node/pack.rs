//! The pack: a collection's small files one after the other, fetched and served as one file
//! (a thousand small files cost one download, not a thousand). Each packed file keeps its
//! own entry and ID; cut from the pack, it is checked against its own hashes.

use std::collections::HashSet;

use p2p_schema::{auto_chunk_size, Collection, ManifestBuilder, Pack};
use tokio_util::sync::CancellationToken;

use super::tree::{io, joined, Tree, SCRATCH};
use super::*;
use crate::local::Identity;

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
}

/// A pack written: what the index says of it, where it is, and its identity as written.
pub(super) struct PackFile {
    pub(super) pack: Pack,
    pub(super) path: PathBuf,
    pub(super) identity: Identity,
}

/// Writes a collection's pack as its small files are hashed, from the bytes hashed (each
/// file is read once): on a thread of its own, which hashes the pack's chunks and writes it in
/// large aligned blocks, directly to the disk where the file system allows (as downloads
/// write), beside the hashing of the files.
pub(super) struct PackWriter {
    files: Vec<String>,
    bytes: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    writer: std::thread::JoinHandle<Result<Manifest, WireError>>,
    temp: PathBuf,
    dir: PathBuf,
}

/// Bytes of the pack written at once.
const PACK_BLOCK: usize = 4 << 20;

impl PackWriter {
    /// A pack in `dir` of files expected to come to about `total` bytes (its chunk size
    /// follows from it).
    pub(super) fn start(dir: &Path, total: u64) -> Result<PackWriter, WireError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let temp = dir.join(format!(".new-{}.pack", fastrand::u64(..)));
        let file =
            std::fs::File::create(&temp).map_err(io(format!("creating {}", temp.display())))?;
        let direct = crate::fileio::open_direct(&temp);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
        let shown = temp.display().to_string();
        let writer = std::thread::spawn(move || {
            let mut builder = ManifestBuilder::new(auto_chunk_size(total));
            let mut block = crate::aligned::AlignedBuf::new();
            block.resize(PACK_BLOCK);
            let (mut filled, mut at) = (0usize, 0u64);
            let write = |block: &[u8], at: u64| -> Result<(), WireError> {
                let aligned = block.len().is_multiple_of(crate::aligned::ALIGN);
                let direct = direct.as_ref().filter(|_| aligned);
                match direct.map(|d| crate::fileio::write_all_at(d, block, at)) {
                    Some(Ok(())) => Ok(()),
                    _ => crate::fileio::write_all_at(&file, block, at)
                        .map_err(io(format!("writing {shown}"))),
                }
            };
            for bytes in rx {
                builder.update(&bytes);
                let mut rest = &bytes[..];
                while !rest.is_empty() {
                    let n = rest.len().min(PACK_BLOCK - filled);
                    block[filled..filled + n].copy_from_slice(&rest[..n]);
                    (filled, rest) = (filled + n, &rest[n..]);
                    if filled == PACK_BLOCK {
                        write(&block, at)?;
                        (filled, at) = (0, at + PACK_BLOCK as u64);
                    }
                }
            }
            write(&block[..filled], at)?;
            file.sync_all().map_err(io(format!("syncing {shown}")))?;
            Ok(builder.finish("pack".into()))
        });
        Ok(PackWriter {
            files: Vec::new(),
            bytes: Some(tx),
            writer,
            temp,
            dir: dir.to_path_buf(),
        })
    }

    /// Appends the file at `path` in the collection, whose bytes are `bytes`.
    pub(super) fn add(&mut self, path: &str, bytes: Vec<u8>) {
        self.files.push(path.to_string());
        // Refused only if the writer stopped on an error, which `finish` reports.
        if let Some(tx) = &self.bytes {
            if tx.send(bytes).is_err() {
                self.bytes = None;
            }
        }
    }

    /// Stops, leaving nothing behind.
    pub(super) fn abort(mut self) {
        self.bytes = None;
        let _ = self.writer.join();
        let _ = std::fs::remove_file(&self.temp);
    }

    /// The pack, in place under its ID's name; `None` (and nothing left behind) if fewer
    /// than two files went in, as a collection packs only two or more.
    pub(super) fn finish(mut self) -> Result<Option<PackFile>, WireError> {
        self.bytes = None;
        let written = self
            .writer
            .join()
            .map_err(|_| err(ErrorCode::Internal, "writing the pack failed"))
            .and_then(|r| r);
        let manifest = match written {
            Ok(m) if self.files.len() >= 2 => m,
            other => {
                let _ = std::fs::remove_file(&self.temp);
                return other.map(|_| None);
            }
        };
        let path = self
            .dir
            .join(format!("{}.pack", manifest.file_id().to_hex()));
        if path.exists() {
            let _ = std::fs::remove_file(&self.temp);
        } else {
            std::fs::rename(&self.temp, &path)
                .map_err(io(format!("renaming {}", self.temp.display())))?;
        }
        let meta = std::fs::metadata(&path).map_err(io(format!("reading {}", path.display())))?;
        Ok(Some(PackFile {
            pack: Pack {
                files: self.files,
                size: manifest.size,
                chunk_size: manifest.chunk_size,
                hashes: manifest.hashes,
            },
            path,
            identity: Identity::of(&meta),
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
    let source = std::fs::File::open(pack).map_err(io(format!("reading {}", pack.display())))?;
    // Two threads: hashing is the bound, and two cores are the least a machine has.
    let half = files.len().div_ceil(2).max(1);
    let written: Vec<(PathBuf, PathBuf, Manifest)> = std::thread::scope(|scope| {
        let workers: Vec<_> = files
            .chunks(half)
            .map(|some| scope.spawn(|| cut_out(&source, pack, part, some)))
            .collect();
        let mut all = Vec::with_capacity(files.len());
        for w in workers {
            let cut = w
                .join()
                .map_err(|_| err(ErrorCode::Internal, "unpacking failed"))??;
            all.extend(cut);
        }
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

/// Writes each of `files` from the pack `source` into `part` under a temporary name, once
/// checked against its own hashes (blocking): temporary and final paths, and manifests.
fn cut_out(
    source: &std::fs::File,
    pack: &Path,
    part: &Path,
    files: &[(String, Manifest, u64)],
) -> Result<Vec<(PathBuf, PathBuf, Manifest)>, WireError> {
    let mut written = Vec::with_capacity(files.len());
    for (path, m, offset) in files {
        let mut bytes = vec![0u8; usize::try_from(m.size).unwrap_or(usize::MAX)];
        crate::fileio::read_exact_at(source, &mut bytes, *offset).map_err(io(format!(
            "reading {} from {}",
            path,
            pack.display()
        )))?;
        if !holds(&bytes, m) {
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
        std::fs::write(&temp, &bytes).map_err(io(format!("writing {}", temp.display())))?;
        written.push((temp, dest, m.clone()));
    }
    Ok(written)
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
