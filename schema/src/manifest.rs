//! What a file is: its [`Manifest`] (name, size, chunk size, one SHA-256 per chunk), how the
//! chunk size is chosen, and how its [`FileId`] is derived.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::FileId;

/// Smallest chunk size chosen automatically or accepted as an override.
pub const MIN_CHUNK_SIZE: u32 = 1024;
/// Largest chunk size accepted (as an override, or from the wire).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Largest chunk size chosen automatically; bigger files get more chunks instead.
pub const MAX_AUTO_CHUNK_SIZE: u32 = 4 << 20;
/// Most chunks one file may have (its hashes then take 8 MiB, within one frame).
pub const MAX_CHUNKS: u64 = 1 << 18;
/// Longest file name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Largest collection index accepted, in bytes (about a million entries of small files).
pub const MAX_INDEX_SIZE: u64 = 256 << 20;

/// Length of a SHA-256 digest.
pub const HASH_LEN: usize = 32;

/// One SHA-256 digest.
pub type ChunkHash = [u8; HASH_LEN];

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> ChunkHash {
    Sha256::digest(data).into()
}

/// The chunk size chosen for a file of `size` bytes when the user does not choose one.
///
/// Small files still split into several chunks (about 8: `doug.png`, 107,330 bytes, gets
/// 16 KiB chunks, so 7 of them); larger ones into about 512 or more chunks of 64 KiB to
/// 1 MiB (1 MiB from 512 MiB on: smaller chunks spread faster through a swarm, larger ones
/// cost less per byte at loopback speeds; a download's buffers are a few chunks, so its
/// memory is the same for any size from 512 MiB to 16 GiB);
/// above 16 GiB chunks grow to keep their number at 16,384, up to [`MAX_AUTO_CHUNK_SIZE`]
/// (beyond 64 GiB the count grows instead).
pub fn auto_chunk_size(size: u64) -> u32 {
    let for_small = size.div_ceil(8).next_power_of_two();
    let for_large = size
        .div_ceil(512)
        .next_power_of_two()
        .clamp(64 << 10, 1 << 20);
    let for_huge = size.div_ceil(16_384).next_power_of_two();
    let chosen = for_large
        .max(for_huge)
        .min(for_small)
        .clamp(u64::from(MIN_CHUNK_SIZE), u64::from(MAX_AUTO_CHUNK_SIZE));
    // The clamp bounds it by a u32 constant.
    u32::try_from(chosen).unwrap_or(MAX_AUTO_CHUNK_SIZE)
}

/// Number of chunks of a file of `size` bytes split into `chunk_size` pieces (the last one
/// may be shorter; an empty file has none).
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    if chunk_size == 0 {
        return 0;
    }
    size.div_ceil(u64::from(chunk_size))
}

/// Why a manifest, a name or a chunk size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes")]
    ChunkSize(u32),
    #[error(
        "{0} chunks is more than the {MAX_CHUNKS} a file may have: choose a larger chunk size"
    )]
    TooManyChunks(u64),
    #[error("manifest has {got} hash bytes, expected {expected}")]
    HashLength { got: usize, expected: u64 },
    #[error("invalid file name {name:?}: {why}")]
    Name { name: String, why: &'static str },
    #[error("a collection index of {0} bytes is more than the {MAX_INDEX_SIZE} accepted")]
    IndexTooLarge(u64),
    #[error("manifest does not match file ID {expected} (it hashes to {actual})")]
    IdMismatch { expected: FileId, actual: FileId },
}

/// Checks a file name received from the user, the tracker or a peer. Names are single path
/// components: no separators, no `..`, no control characters, so that a download can never
/// write outside its target directory.
pub fn validate_name(name: &str) -> Result<(), ManifestError> {
    let bad = |why| {
        Err(ManifestError::Name {
            name: name.chars().take(64).collect(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 255 bytes");
    }
    if name == "." || name == ".." {
        return bad("a relative path component");
    }
    if name.contains(['/', '\\']) {
        return bad("contains a path separator");
    }
    if name.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    Ok(())
}

/// Checks a chunk size given by a user or a peer.
pub fn validate_chunk_size(chunk_size: u32) -> Result<(), ManifestError> {
    if (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(ManifestError::ChunkSize(chunk_size))
    }
}

/// Chunk digests (SHA-256, 32 bytes each, in order), encoded as one byte string.
/// Immutable and shared: a manifest built from a collection's entry holds the entry's digests,
/// not a copy of them (a large tree's files are kept in memory once, not twice).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Hashes(std::sync::Arc<[u8]>);

impl std::ops::Deref for Hashes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Hashes {
    fn from(v: Vec<u8>) -> Hashes {
        Hashes(v.into())
    }
}

impl FromIterator<u8> for Hashes {
    fn from_iter<I: IntoIterator<Item = u8>>(iter: I) -> Hashes {
        Hashes(iter.into_iter().collect())
    }
}

impl AsRef<[u8]> for Hashes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for Hashes {
    fn from(v: &[u8]) -> Hashes {
        Hashes(v.into())
    }
}

impl std::fmt::Debug for Hashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} digests>", self.0.len() / HASH_LEN)
    }
}

impl Serialize for Hashes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Hashes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hashes, D::Error> {
        // Into an allocation of the exact size: a byte string read in pieces ends in a
        // buffer up to twice as large.
        let bytes = serde_bytes::ByteBuf::deserialize(d)?;
        Ok(Hashes(bytes.as_slice().into()))
    }
}

/// Everything needed to fetch and verify a file: what the tracker stores, what a downloader
/// checks against the [`FileId`] it asked for.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The name it was registered under (a single path component, see [`validate_name`]).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes per chunk; the last chunk may be shorter.
    pub chunk_size: u32,
    /// The chunks' SHA-256 digests, concatenated (32 bytes each, in order).
    pub hashes: Hashes,
    /// Whether the bytes are a collection's index ([`crate::Collection`]): a tree of files
    /// shared as one. Part of the ID; absent from the encoding of a plain file, whose
    /// bytes and ID are as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub collection: bool,
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("chunk_size", &self.chunk_size)
            .field("chunks", &self.chunk_count())
            .field("collection", &self.collection)
            .finish()
    }
}

impl Manifest {
    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        // Bounded by MAX_CHUNKS once validated; saturate for unvalidated input.
        u32::try_from(chunk_count(self.size, self.chunk_size)).unwrap_or(u32::MAX)
    }

    /// The expected digest of chunk `index`, if it exists.
    pub fn hash(&self, index: u32) -> Option<&ChunkHash> {
        let start = usize::try_from(index).ok()?.checked_mul(HASH_LEN)?;
        self.hashes.get(start..start + HASH_LEN)?.try_into().ok()
    }

    /// Byte offset and length of chunk `index`, if it exists.
    pub fn chunk_range(&self, index: u32) -> Option<(u64, u32)> {
        if index >= self.chunk_count() {
            return None;
        }
        let offset = u64::from(index) * u64::from(self.chunk_size);
        let len = (self.size - offset).min(u64::from(self.chunk_size));
        Some((offset, len as u32))
    }

    /// The content identity: SHA-256 over a domain tag, the size, the chunk size and the chunk
    /// hashes. The name is not part of it: the same bytes under two names are one file.
    /// A collection's index hashes under another tag: it is never the same file as the same
    /// bytes shared plainly.
    pub fn file_id(&self) -> FileId {
        let mut h = Sha256::new();
        h.update(if self.collection {
            b"p2p-coll-v1\0"
        } else {
            b"p2p-file-v1\0"
        });
        h.update(self.size.to_be_bytes());
        h.update(self.chunk_size.to_be_bytes());
        h.update(&self.hashes);
        FileId(h.finalize().into())
    }

    /// Checks that the manifest is self-consistent: a valid name, a valid chunk size, a
    /// bounded number of chunks and exactly one hash per chunk.
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_name(&self.name)?;
        validate_chunk_size(self.chunk_size)?;
        if self.collection && self.size > MAX_INDEX_SIZE {
            return Err(ManifestError::IndexTooLarge(self.size));
        }
        let chunks = chunk_count(self.size, self.chunk_size);
        if chunks > MAX_CHUNKS {
            return Err(ManifestError::TooManyChunks(chunks));
        }
        let expected = chunks * HASH_LEN as u64;
        if self.hashes.len() as u64 != expected {
            return Err(ManifestError::HashLength {
                got: self.hashes.len(),
                expected,
            });
        }
        Ok(())
    }

    /// [`Self::validate`], and checks that the manifest hashes to `expected`: a tracker or
    /// peer cannot substitute other hashes for a file ID.
    pub fn verify(&self, expected: &FileId) -> Result<(), ManifestError> {
        self.validate()?;
        let actual = self.file_id();
        if actual != *expected {
            return Err(ManifestError::IdMismatch {
                expected: *expected,
                actual,
            });
        }
        Ok(())
    }
}

/// Hashes a stream chunk by chunk into a [`Manifest`]: feed it bytes in any pieces, then call
/// [`ManifestBuilder::finish`]. Used by `register`, which reads files in large blocks.
pub struct ManifestBuilder {
    chunk_size: u32,
    hasher: Sha256,
    in_chunk: u32,
    size: u64,
    hashes: Vec<u8>,
}

impl ManifestBuilder {
    /// A builder for chunks of `chunk_size` bytes (already validated).
    pub fn new(chunk_size: u32) -> Self {
        ManifestBuilder {
            chunk_size,
            hasher: Sha256::new(),
            in_chunk: 0,
            size: 0,
            hashes: Vec::new(),
        }
    }

    /// Adds the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        self.size += data.len() as u64;
        while !data.is_empty() {
            let room = (self.chunk_size - self.in_chunk) as usize;
            let take = room.min(data.len());
            self.hasher.update(&data[..take]);
            self.in_chunk += take as u32;
            data = &data[take..];
            if self.in_chunk == self.chunk_size {
                let digest = std::mem::take(&mut self.hasher).finalize();
                self.hashes.extend_from_slice(&digest);
                self.in_chunk = 0;
            }
        }
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The manifest for the bytes fed, under `name`.
    pub fn finish(mut self, name: String) -> Manifest {
        if self.in_chunk > 0 {
            let digest = self.hasher.finalize();
            self.hashes.extend_from_slice(&digest);
        }
        Manifest {
            name,
            size: self.size,
            chunk_size: self.chunk_size,
            hashes: std::mem::take(&mut self.hashes).into(),
            collection: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_of(data: &[u8], chunk_size: u32) -> Manifest {
        let mut b = ManifestBuilder::new(chunk_size);
        // Feed in odd pieces to exercise chunk boundaries inside one update.
        for piece in data.chunks(777) {
            b.update(piece);
        }
        b.finish("x.bin".into())
    }

    #[test]
    fn digests_are_encoded_as_one_byte_string_as_before() {
        // What earlier versions wrote (`serde_bytes` over a Vec<u8>) and what they read.
        let digests: Vec<u8> = (0..=255u8).cycle().take(3 * HASH_LEN).collect();
        let mut before = Vec::new();
        ciborium::into_writer(&serde_bytes::Bytes::new(&digests), &mut before).unwrap();
        let mut now = Vec::new();
        ciborium::into_writer(&Hashes::from(digests.clone()), &mut now).unwrap();
        assert_eq!(now, before);
        let back: Hashes = ciborium::from_reader(before.as_slice()).unwrap();
        assert_eq!(&back[..], &digests[..]);
    }

    #[test]
    fn auto_chunk_sizes() {
        // doug.png: 7 chunks of 16 KiB.
        assert_eq!(auto_chunk_size(107_330), 16 << 10);
        assert_eq!(chunk_count(107_330, 16 << 10), 7);
        assert_eq!(auto_chunk_size(0), MIN_CHUNK_SIZE);
        assert_eq!(auto_chunk_size(1), MIN_CHUNK_SIZE);
        assert_eq!(auto_chunk_size(1 << 30), 1 << 20);
        assert_eq!(auto_chunk_size(64 << 30), MAX_AUTO_CHUNK_SIZE);
        for size in [
            5_000u64,
            50_000,
            1 << 20,
            100 << 20,
            1 << 30,
            16 << 30,
            1 << 40,
        ] {
            let c = auto_chunk_size(size);
            let n = chunk_count(size, c);
            assert!(
                n <= 16_384 || c == MAX_AUTO_CHUNK_SIZE,
                "{size}: {n} chunks"
            );
            if (512 << 20..=16 << 30).contains(&size) {
                assert_eq!(c, 1 << 20, "{size}: chunks of 1 MiB");
            }
            assert!(n <= MAX_CHUNKS);
            if size >= 8 * u64::from(MIN_CHUNK_SIZE) {
                assert!(n >= 4, "{size} splits into {n} chunks only");
            }
        }
    }

    #[test]
    fn builder_matches_direct_hashing() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let m = manifest_of(&data, 1024);
        assert_eq!(m.chunk_count(), 10);
        assert_eq!(m.size, 10_000);
        for i in 0..10 {
            let (off, len) = m.chunk_range(i).unwrap();
            let direct = sha256(&data[off as usize..off as usize + len as usize]);
            assert_eq!(m.hash(i), Some(&direct));
        }
        assert_eq!(m.chunk_range(9), Some((9216, 784)));
        assert_eq!(m.chunk_range(10), None);
        assert_eq!(m.hash(10), None);
        m.validate().unwrap();
    }

    #[test]
    fn edge_sizes() {
        let cs = 1024u32;
        for size in [0usize, 1, 1023, 1024, 1025, 3 * 1024] {
            let data = vec![0x5a; size];
            let m = manifest_of(&data, cs);
            assert_eq!(m.chunk_count() as u64, chunk_count(size as u64, cs));
            assert_eq!(m.hashes.len(), m.chunk_count() as usize * HASH_LEN);
            m.validate().unwrap();
        }
    }

    #[test]
    fn id_covers_content_not_name() {
        let data = vec![1u8; 5000];
        let a = manifest_of(&data, 1024);
        let mut b = a.clone();
        b.name = "other name".into();
        assert_eq!(a.file_id(), b.file_id());
        let mut c = a.clone();
        let mut flipped = c.hashes.to_vec();
        flipped[0] ^= 1;
        c.hashes = flipped.into();
        assert_ne!(a.file_id(), c.file_id());
        assert!(matches!(
            c.verify(&a.file_id()),
            Err(ManifestError::IdMismatch { .. })
        ));
        let mut d = a.clone();
        d.size += 1;
        assert_ne!(a.file_id(), d.file_id());
        a.verify(&a.file_id()).unwrap();
    }

    #[test]
    fn invalid_manifests() {
        let mut m = manifest_of(&[1, 2, 3], 1024);
        m.hashes = [&m.hashes[..], &[0]].concat().into();
        assert!(matches!(
            m.validate(),
            Err(ManifestError::HashLength { .. })
        ));
        let m = Manifest {
            collection: false,
            name: "a".into(),
            size: u64::MAX,
            chunk_size: MIN_CHUNK_SIZE,
            hashes: Hashes::default(),
        };
        assert!(matches!(m.validate(), Err(ManifestError::TooManyChunks(_))));
        assert_eq!(m.chunk_count(), u32::MAX);
        assert!(validate_chunk_size(0).is_err());
        assert!(validate_chunk_size(MAX_CHUNK_SIZE + 1).is_err());
    }

    #[test]
    fn names() {
        for ok in ["doug.png", "a b c.txt", "ünïcødé ✓", ".hidden", "..."] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/etc/passwd",
            "..\\x",
            "a\0b",
            "bell\x07",
            "line\nbreak",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_name(&"n".repeat(256)).is_err());
    }
}
