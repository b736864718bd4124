//! What the daemon keeps in sled: its identity, its shares, its downloads and, per download,
//! which chunks are verified and durable. Chunk bytes live in ordinary files, never in sled.
//!
//! Trees (keys big-endian, values CBOR):
//! - `meta`: `created` -> present once the database has been opened; `clean` -> present
//!   only while stopped cleanly; `peer_id` -> 16 bytes, written by versions before keys
//!   (the peer ID is now derived from `identity.key`), read only as a sign of an old database
//! - `shares`: `FileId` -> [`ShareRecord`]
//! - `downloads`: `FileId` -> [`DownloadRecord`]
//! - `chunks`: `FileId || u32 index` -> empty: chunk held by an unfinished download
//! - `collections`: `FileId` (of the index) -> [`CollectionRecord`]: a collection downloaded
//!
//! Ordering rule (see `download::Committer`): a chunk key is written only after its bytes
//! were written to the partial file *and* that file was synced, so after any crash every
//! recorded chunk is really on disk.

use std::path::Path;

use p2p_schema::{Bitfield, DownloadState, FileId, Manifest};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::local::Identity;
use crate::Error;

/// A file this daemon serves whole from where it lies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareRecord {
    pub manifest: Manifest,
    pub path: String,
    /// The file's [`Identity`] when hashed (or completed): if it changes, the file is no
    /// longer served. Records written before inode, device and change time were kept lack
    /// them (`None`); they are then not compared.
    pub size: u64,
    pub mtime_ns: i128,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctime_ns: Option<i128>,
    /// The collection the file is shared for, when it is shared only as part of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<FileId>,
}

impl ShareRecord {
    /// The record of `manifest`'s file at `path`, with the identity it must keep.
    pub fn new(manifest: Manifest, path: String, identity: Identity) -> ShareRecord {
        ShareRecord {
            manifest,
            path,
            size: identity.size,
            mtime_ns: identity.mtime_ns,
            inode: identity.file.map(|(inode, _)| inode),
            device: identity.file.map(|(_, device)| device),
            ctime_ns: identity.ctime_ns,
            collection: None,
        }
    }

    /// The identity the file must keep to be served.
    pub fn identity(&self) -> Identity {
        Identity {
            size: self.size,
            mtime_ns: self.mtime_ns,
            file: self.inode.zip(self.device),
            ctime_ns: self.ctime_ns,
        }
    }
}

/// A download, finished or not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownloadRecord {
    pub manifest: Manifest,
    /// Where the finished file goes.
    pub output: String,
    /// Where the chunks are written until then (same directory, `.part` suffix).
    pub part: String,
    pub state: DownloadState,
    /// Bytes fetched again because a crash tore them before they were made durable.
    #[serde(default)]
    pub refetched: u64,
    /// The collection this file is fetched for, if it is fetched only as a member of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<FileId>,
}

/// A collection being downloaded (or downloaded): its files are downloads and shares of
/// their own, marked with the collection's ID.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CollectionRecord {
    /// The manifest of the collection's index.
    pub manifest: Manifest,
    /// Where the finished tree goes.
    pub output: String,
    /// Where it is built until every file is verified (beside it, `.part` suffix).
    pub part: String,
    pub state: DownloadState,
    /// Files in the tree and their bytes, once its index is known.
    #[serde(default)]
    pub files: u64,
    #[serde(default)]
    pub bytes: u64,
    /// Whether `part` was created by this download (recorded durably right after): only
    /// then is an existing `part` taken for its own after a restart.
    #[serde(default)]
    pub reserved: bool,
}

/// The daemon's database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    shares: sled::Tree,
    downloads: sled::Tree,
    chunks: sled::Tree,
    collections: sled::Tree,
}

use p2p_service::store::to_cbor as cbor;

fn db_err(what: &str) -> impl FnOnce(sled::Error) -> Error + '_ {
    move |e| Error::Db(what.to_string(), e)
}

impl Store {
    /// Opens the database under `dir` by the rule both programs share
    /// ([`p2p_service::store`]): one locked by another holder is waited for, then reported as
    /// in use and never moved aside; only one that fails its checks on opening is moved aside
    /// (shares must then be registered again). Blocks: call it off the executor.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        let config = |c: sled::Config| c.cache_capacity(16 << 20).flush_every_ms(Some(500));
        let db = p2p_service::store::open("p2pd", dir, "state.sled", config)
            .map_err(|e| Error::Other(e.to_string()))?
            .db;
        let tree = |name: &str| db.open_tree(name).map_err(db_err("opening tree"));
        Ok(Store {
            meta: tree("meta")?,
            shares: tree("shares")?,
            downloads: tree("downloads")?,
            chunks: tree("chunks")?,
            collections: tree("collections")?,
            db,
        })
    }

    /// Did the previous run stop cleanly? Then marks this run as not (yet) stopped cleanly,
    /// durably, so a crash from here on is noticed at the next start.
    pub async fn take_clean_flag(&self) -> Result<bool, Error> {
        // A brand-new database has nothing to doubt. `created` marks one that is not; one of
        // an earlier version has its `peer_id` instead.
        let seen = |key: &str| -> Result<bool, Error> {
            Ok(self
                .meta
                .get(key)
                .map_err(db_err("reading the database's marks"))?
                .is_some())
        };
        let fresh = !seen("created")? && !seen("peer_id")?;
        if fresh {
            self.meta
                .insert("created", &[1u8][..])
                .map_err(db_err("marking the database created"))?;
        }
        let clean = fresh
            || self
                .meta
                .remove("clean")
                .map_err(db_err("reading clean flag"))?
                .is_some();
        self.flush().await?;
        Ok(clean)
    }

    /// Records a clean stop (call last, after everything else is flushed).
    pub async fn mark_clean(&self) -> Result<(), Error> {
        self.meta
            .insert("clean", &[1u8][..])
            .map_err(db_err("writing clean flag"))?;
        self.flush().await
    }

    /// All share records (unreadable ones are skipped with a warning).
    pub fn shares(&self) -> Vec<(FileId, ShareRecord)> {
        decode_all(&self.shares, "share")
    }

    /// All download records.
    pub fn downloads(&self) -> Vec<(FileId, DownloadRecord)> {
        decode_all(&self.downloads, "download")
    }

    /// All collection download records.
    pub fn collections(&self) -> Vec<(FileId, CollectionRecord)> {
        decode_all(&self.collections, "collection")
    }

    pub fn put_collection(&self, id: &FileId, rec: &CollectionRecord) -> Result<(), Error> {
        self.collections
            .insert(id.0, cbor(rec))
            .map(drop)
            .map_err(db_err("writing collection"))
    }

    pub fn remove_collection(&self, id: &FileId) -> Result<(), Error> {
        self.collections
            .remove(id.0)
            .map(drop)
            .map_err(db_err("removing collection"))
    }

    pub fn put_share(&self, id: &FileId, rec: &ShareRecord) -> Result<(), Error> {
        self.shares
            .insert(id.0, cbor(rec))
            .map(drop)
            .map_err(db_err("writing share"))
    }

    pub fn remove_share(&self, id: &FileId) -> Result<(), Error> {
        self.shares
            .remove(id.0)
            .map(drop)
            .map_err(db_err("removing share"))
    }

    pub fn put_download(&self, id: &FileId, rec: &DownloadRecord) -> Result<(), Error> {
        self.downloads
            .insert(id.0, cbor(rec))
            .map(drop)
            .map_err(db_err("writing download"))
    }

    pub fn remove_download(&self, id: &FileId) -> Result<(), Error> {
        self.downloads
            .remove(id.0)
            .map(drop)
            .map_err(db_err("removing download"))
    }

    /// The chunks recorded as held for download `id`, over `chunks` chunks.
    ///
    /// A download's inventory is one value under its ID: a bitfield (bit `i` is `0x80 >> i % 8`
    /// of byte `i / 8`), rewritten by each commit, so the database does not grow with the
    /// number of chunks. Inventories written by earlier versions, one key per chunk
    /// (`<id><index>`), are still read.
    pub fn held_chunks(&self, id: &FileId, chunks: u32) -> Bitfield {
        let mut bits = Bitfield::new(chunks);
        for item in self.chunks.scan_prefix(id.0) {
            match item {
                Ok((k, v)) if k.len() == 32 => {
                    for (byte, b) in v.iter().enumerate().filter(|(_, b)| **b != 0) {
                        for bit in 0..8 {
                            let i = byte as u64 * 8 + bit;
                            if b & (0x80 >> bit) != 0 && i < u64::from(chunks) {
                                bits.set(i as u32);
                            }
                        }
                    }
                }
                Ok((k, _)) if k.len() == 36 => {
                    bits.set(u32::from_be_bytes([k[32], k[33], k[34], k[35]]));
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "reading chunk inventory"),
            }
        }
        bits
    }

    /// Records chunks as held. Call only once their bytes are synced to disk.
    pub fn record_chunks(&self, id: &FileId, indices: &[u32]) -> Result<(), Error> {
        self.chunks
            .fetch_and_update(id.0, |old| {
                let mut bits = old.map(|o| o.to_vec()).unwrap_or_default();
                for &i in indices {
                    let byte = (i / 8) as usize;
                    if bits.len() <= byte {
                        bits.resize(byte + 1, 0);
                    }
                    bits[byte] |= 0x80 >> (i % 8);
                }
                Some(bits)
            })
            .map(|_| ())
            .map_err(db_err("recording chunks"))
    }

    /// Forgets the chunk inventory of download `id` (finished or cancelled).
    pub fn clear_chunks(&self, id: &FileId) -> Result<(), Error> {
        let mut batch = sled::Batch::default();
        for k in self.chunks.scan_prefix(id.0).keys().flatten() {
            batch.remove(k);
        }
        self.chunks
            .apply_batch(batch)
            .map_err(db_err("clearing chunks"))
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), Error> {
        self.db
            .flush_async()
            .await
            .map(drop)
            .map_err(db_err("flushing state"))
    }
}

fn decode_all<T: for<'de> Deserialize<'de>>(tree: &sled::Tree, what: &str) -> Vec<(FileId, T)> {
    let mut out = Vec::new();
    for item in tree.iter() {
        let decoded = item.ok().and_then(|(k, v)| {
            Some((
                FileId::from_slice(&k)?,
                ciborium::from_reader::<T, _>(&v[..]).ok()?,
            ))
        });
        match decoded {
            Some(x) => out.push(x),
            None => warn!("skipping an unreadable {what} record"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest {
            collection: false,
            name: "a".into(),
            size: 3000,
            chunk_size: 1024,
            hashes: vec![1; 96].into(),
        };
        let id = m.file_id();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put_download(
                &id,
                &DownloadRecord {
                    collection: None,
                    manifest: m.clone(),
                    output: "/o".into(),
                    part: "/o.part".into(),
                    state: DownloadState::Running,
                    refetched: 0,
                },
            )
            .unwrap();
            s.record_chunks(&id, &[0, 2]).unwrap();
            s.db.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let downloads = s.downloads();
        assert_eq!(downloads.len(), 1);
        assert_eq!(downloads[0].1.state, DownloadState::Running);
        assert_eq!(s.held_chunks(&id, 3).iter().collect::<Vec<_>>(), vec![0, 2]);
        s.clear_chunks(&id).unwrap();
        assert_eq!(s.held_chunks(&id, 3).count(), 0);
    }

    #[test]
    fn share_records_of_earlier_versions_are_still_read() {
        // The form written before inode, device and change time were kept.
        #[derive(Serialize)]
        struct Earlier {
            manifest: Manifest,
            path: String,
            size: u64,
            mtime_ns: i128,
        }
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let manifest = Manifest {
            collection: false,
            name: "a".into(),
            size: 10,
            chunk_size: 1024,
            hashes: vec![1; 32].into(),
        };
        let id = manifest.file_id();
        let earlier = Earlier {
            manifest,
            path: "/x/a".into(),
            size: 10,
            mtime_ns: 1_700_000_000_000_000_007,
        };
        s.shares.insert(id.0, cbor(&earlier)).unwrap();
        let shares = s.shares();
        assert_eq!(shares.len(), 1);
        let identity = shares[0].1.identity();
        assert_eq!((identity.size, identity.mtime_ns), (10, earlier.mtime_ns));
        assert_eq!((identity.file, identity.ctime_ns), (None, None));
        // And a record with all of it comes back whole.
        let full = Identity {
            size: 10,
            mtime_ns: 5,
            file: Some((7, 8)),
            ctime_ns: Some(9),
        };
        s.put_share(
            &id,
            &ShareRecord::new(shares[0].1.manifest.clone(), "/x/a".into(), full),
        )
        .unwrap();
        assert_eq!(s.shares()[0].1.identity(), full);
    }

    #[test]
    fn chunk_inventories_of_earlier_versions_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let id = FileId([9; 32]);
        // The old form: one key per chunk.
        for i in [1u32, 17] {
            let mut k = id.0.to_vec();
            k.extend_from_slice(&i.to_be_bytes());
            s.chunks.insert(k, &[][..]).unwrap();
        }
        s.record_chunks(&id, &[0, 17, 20]).unwrap();
        s.record_chunks(&id, &[3]).unwrap();
        let held: Vec<u32> = s.held_chunks(&id, 21).iter().collect();
        assert_eq!(held, vec![0, 1, 3, 17, 20]);
        // Bits past the file's end (a corrupt value) are ignored, not a panic.
        assert_eq!(
            s.held_chunks(&id, 4).iter().collect::<Vec<_>>(),
            vec![0, 1, 3]
        );
        s.clear_chunks(&id).unwrap();
        assert_eq!(s.held_chunks(&id, 21).count(), 0);
    }

    #[test]
    fn a_locked_database_is_waited_for_and_never_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        first.meta.insert("mark", &[7u8][..]).unwrap();
        first.db.flush().unwrap();
        // Held throughout: reported as in use, and left where it is.
        let e = Store::open(dir.path())
            .err()
            .expect("a locked database must not open");
        assert!(e.to_string().contains("another p2pd is using"), "{e}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "nothing moved"
        );
        // Let go soon after: the second open waits for it, and finds the same state.
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        let second = Store::open(dir.path()).unwrap();
        assert_eq!(
            second.meta.get("mark").unwrap().as_deref(),
            Some(&[7u8][..])
        );
        t.join().unwrap();
    }

    #[tokio::test]
    async fn a_crash_is_noticed_in_new_databases_and_in_those_of_earlier_versions() {
        // A new database: nothing to doubt the first time; a crash after that is noticed.
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert!(s.take_clean_flag().await.unwrap(), "fresh");
        }
        let s = Store::open(dir.path()).unwrap();
        assert!(
            !s.take_clean_flag().await.unwrap(),
            "a crash after the first start"
        );
        s.mark_clean().await.unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert!(s.take_clean_flag().await.unwrap(), "a clean stop");
        // One written by a version before keys (its peer ID, no `created` mark), not stopped
        // cleanly: noticed too.
        let old = tempfile::tempdir().unwrap();
        {
            let s = Store::open(old.path()).unwrap();
            s.meta.insert("peer_id", &[9u8; 16][..]).unwrap();
            s.db.flush().unwrap();
        }
        let s = Store::open(old.path()).unwrap();
        assert!(
            !s.take_clean_flag().await.unwrap(),
            "an earlier version's crash"
        );
    }
}
