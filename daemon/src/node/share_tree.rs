//! `register DIR`: a tree of files shared as one collection. Every regular file under the
//! directory is hashed and shared from where it lies (as a member of the collection, not
//! announced alone); the index listing them is written under the data directory and shared
//! as the collection's own file. Symbolic links and special files are skipped, never
//! followed: nothing outside the directory is read.

use std::collections::HashSet;
use std::fs::Metadata;

use p2p_schema::{validate_name, Collection, CollectionInfo, Entry, Pack, PACK_MAX};

use super::pack::PackHasher;
use super::tree::io;
use super::*;
use crate::local::Identity;
use crate::register::hash_file_keeping;

/// What a walk of the tree found.
struct Walked {
    files: Vec<Found>,
    dirs: Vec<String>,
    skipped: Vec<String>,
}

/// A regular file under the tree.
struct Found {
    /// Its path relative to the tree, `/`-separated.
    rel: String,
    abs: PathBuf,
    executable: bool,
    /// The identity the walk saw: the file hashed must be this one (a component swapped for
    /// a symbolic link meanwhile would lead elsewhere).
    seen: Identity,
}

fn bad(message: String) -> WireError {
    err(ErrorCode::BadRequest, message)
}

#[cfg(unix)]
fn executable(meta: &Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o100 != 0
}

#[cfg(not(unix))]
fn executable(_: &Metadata) -> bool {
    false
}

/// What a skipped entry is, for the list of skipped ones.
fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        return "symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "named pipe";
        }
        if t.is_socket() {
            return "socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "device";
        }
    }
    "special file"
}

/// Lists the tree under `root` without following any symbolic link (blocking).
fn walk(root: &Path) -> Result<Walked, WireError> {
    let mut out = Walked {
        files: Vec::new(),
        dirs: Vec::new(),
        skipped: Vec::new(),
    };
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(io(format!("listing {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(io(format!("listing {}", dir.display())))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| {
                bad(format!(
                    "{}: names that are not valid UTF-8 cannot be shared; rename it",
                    path.display()
                ))
            })?;
            validate_name(name).map_err(|e| bad(format!("{}: {e}", path.display())))?;
            let child = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            // Not followed: the entry itself.
            let meta = std::fs::symlink_metadata(&path)
                .map_err(io(format!("reading {}", path.display())))?;
            if meta.is_dir() {
                out.dirs.push(child.clone());
                stack.push((path, child));
            } else if meta.is_file() {
                out.files.push(Found {
                    rel: child,
                    abs: path,
                    executable: executable(&meta),
                    seen: Identity::of(&meta),
                });
            } else {
                out.skipped.push(format!("{child} ({})", kind(&meta)));
            }
        }
    }
    out.skipped.sort();
    Ok(out)
}

/// The collection's entries: every directory, and every file with what hashing found.
fn entries_of(walked: &Walked, hashed: &[Hashed]) -> Vec<Entry> {
    let dirs = walked
        .dirs
        .iter()
        .map(|path| Entry::Dir { path: path.clone() });
    let files = walked
        .files
        .iter()
        .zip(hashed)
        .map(|(found, (m, _))| Entry::File {
            path: found.rel.clone(),
            executable: found.executable,
            size: m.size,
            chunk_size: m.chunk_size,
            hashes: m.hashes.clone(),
        });
    dirs.chain(files).collect()
}

/// A file's manifest and its identity as hashed.
type Hashed = (Manifest, Identity);

/// Hashes every file found (blocking), in the collection's order (by path), and the pack of
/// the small ones from the same reads; `progress(done, total)` over all their bytes.
fn hash_all(
    files: &mut [Found],
    chunk_size: Option<u32>,
    progress: impl Fn(u64, u64),
) -> Result<(Vec<Hashed>, Option<Pack>), WireError> {
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    let total: u64 = files.iter().map(|f| f.seen.size).sum();
    let small = |size: u64| size > 0 && size < PACK_MAX;
    let packed: u64 = files
        .iter()
        .map(|f| f.seen.size)
        .filter(|&n| small(n))
        .sum();
    let mut pack = PackHasher::start(packed);
    let mut in_pack = HashSet::new();
    let mut before = 0u64;
    let mut out = Vec::with_capacity(files.len());
    let hashed = files.iter().try_for_each(|f| {
        let name = f.rel.rsplit('/').next().unwrap_or(&f.rel).to_string();
        let (hashed, bytes) = hash_file_keeping(&f.abs, name, chunk_size, |done, _| {
            progress(before + done, total)
        })?;
        if hashed.identity.file != f.seen.file {
            return Err(err(
                ErrorCode::Io,
                format!(
                    "{} was replaced while the tree was being read; try again",
                    f.abs.display()
                ),
            ));
        }
        let m = hashed.manifest;
        // As `Collection::packable` picks them: small, not empty, each content once.
        if let Some(bytes) = bytes.filter(|_| small(m.size) && in_pack.insert(m.file_id())) {
            pack.add(&f.rel, bytes);
        }
        before += m.size;
        // Not kept open: a tree may hold more files than this process may open.
        out.push((m, hashed.identity));
        Ok(())
    });
    hashed?;
    Ok((out, pack.finish()?))
}

impl Node {
    /// Shares the tree under `dir` as one collection. Hashing progress (over all its bytes)
    /// goes to `progress`.
    pub(super) async fn register_tree(
        &self,
        dir: PathBuf,
        chunk_size: Option<u32>,
        progress: mpsc::Sender<(u64, u64)>,
    ) -> Result<(FileSummary, CollectionInfo), WireError> {
        let name = share_name(&dir)?;
        let (walked, hashed, packed) = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || -> Result<_, WireError> {
                let mut walked = walk(&dir)?;
                let (hashed, packed) = hash_all(&mut walked.files, chunk_size, |done, total| {
                    let _ = progress.try_send((done, total));
                })?;
                Ok((walked, hashed, packed))
            })
            .await
            .map_err(|e| err(ErrorCode::Internal, e.to_string()))??
        };
        let mut collection = Collection::new(entries_of(&walked, &hashed));
        collection.pack = packed;
        collection
            .validate()
            .map_err(|e| bad(format!("{} cannot be shared: {e}", dir.display())))?;
        let info = CollectionInfo {
            files: collection.file_count() as u64,
            bytes: collection.total_size(),
            skipped: walked.skipped,
        };
        let index = self.write_index(&name, &collection).await?;
        let cid = index.manifest.file_id();
        for (found, (manifest, identity)) in walked.files.iter().zip(hashed) {
            self.share_member(cid, &found.abs, manifest, identity)?;
        }
        self.serve_pack(cid, &collection, &dir);
        let manifest = Arc::new(index.manifest);
        self.share_index(manifest.clone(), index.file, index.path, index.identity)?;
        // Recorded as a collection held whole: `status`, `unregister` and restarts see it.
        let tree = Arc::new(Tree::new(
            manifest.clone(),
            dir.clone(),
            PathBuf::new(),
            DownloadState::Complete,
            (info.files, info.bytes),
        ));
        self.store
            .put_collection(&cid, &tree.record())
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        lock(&self.trees).insert(cid, tree);
        self.store
            .flush()
            .await
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        info!(
            collection = %cid.short(),
            path = %dir.display(),
            files = info.files,
            bytes = info.bytes,
            skipped = info.skipped.len(),
            "directory shared"
        );
        let file = self.announce_registered(&manifest).await?;
        self.announce_members(&cid);
        Ok((file, info))
    }

    /// Records one file of collection `cid` as shared from `path`, unless it is shared
    /// already (alone, or by another collection): one record per content.
    pub(super) fn share_member(
        &self,
        cid: FileId,
        path: &Path,
        manifest: Manifest,
        identity: Identity,
    ) -> Result<(), WireError> {
        let id = manifest.file_id();
        if manifest.size == 0 {
            // Nothing to serve: a downloader creates it empty.
            return Ok(());
        }
        if self
            .local_file(&id)
            .is_some_and(|f| f.is_complete() && f.problem().is_none())
        {
            return Ok(());
        }
        let mut record = ShareRecord::new(manifest.clone(), utf8(path)?, identity);
        record.collection = Some(cid);
        self.store
            .put_share(&id, &record)
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        let local = LocalFile::closed(Arc::new(manifest), path.to_path_buf(), identity);
        local.set_collection(Some(cid));
        self.insert_file(Arc::new(local));
        Ok(())
    }

    /// Where collections' indexes and packs are kept.
    pub(super) fn collections_dir(&self) -> PathBuf {
        self.config.data_dir.join("collections")
    }

    /// Where a collection's index is kept.
    pub(super) fn index_path(&self, cid: &FileId) -> PathBuf {
        self.collections_dir()
            .join(format!("{}.index", cid.to_hex()))
    }

    /// Where a pack is kept.
    pub(super) fn pack_path(&self, pack: &FileId) -> PathBuf {
        self.collections_dir()
            .join(format!("{}.pack", pack.to_hex()))
    }

    /// Writes `collection`'s index under the data directory and hashes it: the collection's
    /// own file, named `name`.
    async fn write_index(&self, name: &str, collection: &Collection) -> Result<Index, WireError> {
        let dir = self.config.data_dir.join("collections");
        let bytes = collection.encode();
        let name = name.to_string();
        let temp = dir.join(format!(".new-{}.index", fastrand::u64(..)));
        tokio::task::spawn_blocking(move || -> Result<Index, WireError> {
            std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
            std::fs::write(&temp, &bytes).map_err(io(format!("writing {}", temp.display())))?;
            let hashed = hash_file(&temp, name, None, |_, _| {});
            let mut hashed = match hashed {
                Ok(h) => h,
                Err(e) => {
                    let _ = std::fs::remove_file(&temp);
                    return Err(e);
                }
            };
            hashed.manifest.collection = true;
            let id = hashed.manifest.file_id();
            let path = dir.join(format!("{}.index", id.to_hex()));
            if path.exists() {
                // The same tree registered before: its index is already here, unchanged.
                let _ = std::fs::remove_file(&temp);
            } else {
                hashed
                    .file
                    .sync_all()
                    .map_err(io(format!("syncing {}", temp.display())))?;
                std::fs::rename(&temp, &path)
                    .map_err(io(format!("renaming {}", temp.display())))?;
            }
            let (file, meta) = crate::register::open_regular(&path)?;
            Ok(Index {
                manifest: hashed.manifest,
                file,
                identity: Identity::of(&meta),
                path,
            })
        })
        .await
        .map_err(|e| err(ErrorCode::Internal, e.to_string()))?
    }

    /// Shares a collection's index (recorded, served, not yet announced).
    pub(super) fn share_index(
        &self,
        manifest: Arc<Manifest>,
        file: std::fs::File,
        path: PathBuf,
        identity: Identity,
    ) -> Result<(), WireError> {
        let id = manifest.file_id();
        let record = ShareRecord::new((*manifest).clone(), utf8(&path)?, identity);
        self.store
            .put_share(&id, &record)
            .map_err(|e| err(ErrorCode::Io, e.to_string()))?;
        let chunks = manifest.chunk_count();
        let local = LocalFile::new(manifest, file, path, Bitfield::full(chunks));
        local.set_source(identity);
        self.insert_file(Arc::new(local));
        Ok(())
    }
}

/// A collection's index, written and hashed.
struct Index {
    manifest: Manifest,
    file: std::fs::File,
    path: PathBuf,
    identity: Identity,
}
