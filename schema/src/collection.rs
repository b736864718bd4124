//! A collection: a tree of files shared as one. Its index lists every entry (a directory, or
//! a file with its mode, size and chunk hashes) by its path relative to the tree's root, in
//! byte order. The index travels as the content of an ordinary file whose [`Manifest`] says
//! `collection`, so trackers store it and peers serve it like any other file; the
//! collection's ID is that file's ID, a hash over the index, which lists the entries.
//!
//! A file inside a collection is the same file as the same bytes registered alone: its
//! [`FileId`] comes from its size, chunk size and hashes, never from its path.
//!
//! Every path is checked component by component before anything is written
//! ([`Collection::decode`]): a collection can never name a place outside its directory, nor
//! two entries that one file system would take for one.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

use crate::{validate_name, FileId, Hashes, Manifest, ManifestError, MAX_NAME_LEN};

/// Most entries (files and directories) one collection may list.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Longest path inside a collection, in bytes.
pub const MAX_PATH_LEN: usize = 4096;

/// One entry of a collection's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A directory (listed so that empty ones are kept).
    Dir { path: String },
    /// A regular file.
    File {
        path: String,
        /// Whether the owner may execute it (restored on download; other mode bits are not).
        executable: bool,
        size: u64,
        chunk_size: u32,
        /// The chunks' SHA-256 digests, as in [`Manifest::hashes`].
        hashes: Hashes,
    },
}

impl Entry {
    /// Its path, relative to the collection's root, `/`-separated.
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path } | Entry::File { path, .. } => path,
        }
    }

    /// Its size in bytes (0 for a directory).
    pub fn size(&self) -> u64 {
        match self {
            Entry::File { size, .. } => *size,
            Entry::Dir { .. } => 0,
        }
    }

    /// For a file: its manifest (named after the path's last component).
    pub fn manifest(&self) -> Option<Manifest> {
        match self {
            Entry::Dir { .. } => None,
            Entry::File {
                path,
                size,
                chunk_size,
                hashes,
                ..
            } => Some(Manifest {
                name: path.rsplit('/').next().unwrap_or(path).to_string(),
                size: *size,
                chunk_size: *chunk_size,
                hashes: hashes.clone(),
                collection: false,
            }),
        }
    }

    /// For a file: its content ID (the same as for the same bytes registered alone).
    pub fn file_id(&self) -> Option<FileId> {
        self.manifest().map(|m| m.file_id())
    }
}

/// Why an index was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectionError {
    #[error("the collection index is not readable: {0}")]
    Decode(String),
    #[error("the collection lists {0} entries; at most {MAX_ENTRIES} are accepted")]
    TooManyEntries(usize),
    #[error("invalid path {path:?} in the collection: {why}")]
    Path { path: String, why: String },
    #[error("the collection lists {0:?} twice, or out of order")]
    Order(String),
    #[error("{file:?} is a file in the collection but also the directory of {inner:?}")]
    FileIsDir { file: String, inner: String },
    #[error(
        "{a:?} and {b:?} would be one file on a case-insensitive or Unicode-normalising file system"
    )]
    Collision { a: String, b: String },
    #[error("file {path:?} in the collection: {source}")]
    File { path: String, source: ManifestError },
    #[error("the collection's files add up to more than 2^64 bytes")]
    TooLarge,
    #[error("the collection's pack does not match its files: {0}")]
    Pack(String),
}

/// A collection's index: its entries, sorted by path, and the pack of its small files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collection {
    pub entries: Vec<Entry>,
    /// Small files, concatenated into one file fetched as a whole: a thousand small files
    /// then cost one download, not a thousand (each still has its own entry, and its own ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<Pack>,
}

/// Files smaller than this are packed (when a tree has more than one).
pub const PACK_MAX: u64 = 1 << 20;

/// The small files of a collection, one after the other (see [`Collection::pack`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pack {
    /// The files, by path, in the order their bytes follow each other: each at the offset
    /// where the previous one ended.
    pub files: Vec<String>,
    pub size: u64,
    pub chunk_size: u32,
    /// The pack's chunk hashes, as in [`Manifest::hashes`].
    pub hashes: Hashes,
}

impl Pack {
    /// The pack as a file of its own (it is fetched and served like one).
    pub fn manifest(&self) -> Manifest {
        Manifest {
            name: "pack".into(),
            size: self.size,
            chunk_size: self.chunk_size,
            hashes: self.hashes.clone(),
            collection: false,
        }
    }
}

/// Checks one path from a collection: `/`-separated components, each a valid name (no `..`,
/// no `.`, no separators, no control characters), no empty component, bounded length.
pub fn validate_path(path: &str) -> Result<(), CollectionError> {
    let bad = |why: String| CollectionError::Path {
        path: path.chars().take(128).collect(),
        why,
    };
    if path.len() > MAX_PATH_LEN {
        return Err(bad(format!("longer than {MAX_PATH_LEN} bytes")));
    }
    if path.starts_with('/') {
        return Err(bad("an absolute path".into()));
    }
    for component in path.split('/') {
        if component.is_empty() {
            return Err(bad("an empty component".into()));
        }
        if component.len() > MAX_NAME_LEN {
            return Err(bad(format!("a component longer than {MAX_NAME_LEN} bytes")));
        }
        validate_name(component).map_err(|e| match e {
            ManifestError::Name { why, .. } => bad(why.to_string()),
            other => bad(other.to_string()),
        })?;
    }
    Ok(())
}

/// How a name is seen by a file system that ignores case and Unicode normalisation. Lower
/// case, then upper and lower again: names equal once lower-cased stay equal, and those that
/// differ only in characters whose upper case is another's (`ſ` and `s`, the Kelvin sign and
/// `K`) are equal too, as under NTFS's upper-casing and APFS's case folding. It may take two
/// names for one that a file system keeps apart (`ß` and `ss`): refused, never written over.
fn folded(name: &str) -> String {
    name.nfc()
        .flat_map(char::to_lowercase)
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .nfc()
        .collect()
}

/// Deepest path accepted, in components.
pub const MAX_DEPTH: usize = 128;
/// Most path components one index may hold in all (files and the directories above them).
pub const MAX_COMPONENTS: usize = 4_000_000;

/// A collection's paths as a folding file system sees them: one node per directory or file,
/// keyed by its parent and its folded name. Checking a path costs its length, whatever the
/// depth of the tree (a key per ancestor path would cost its square).
#[derive(Default)]
struct Folded<'a> {
    nodes: HashMap<(usize, String), Node<'a>>,
    visited: usize,
}

struct Node<'a> {
    id: usize,
    /// The path up to this node, as the index spells it.
    spelled: &'a str,
    file: bool,
}

impl<'a> Folded<'a> {
    /// Adds `path` (a file if `file`): refused if a folding file system would take one of its
    /// components for another spelling already seen, or if one of its directories is a file.
    fn add(&mut self, path: &'a str, file: bool) -> Result<(), CollectionError> {
        let depth = path.split('/').count();
        self.visited += depth;
        if depth > MAX_DEPTH || self.visited > MAX_COMPONENTS {
            return Err(CollectionError::Path {
                path: path.chars().take(128).collect(),
                why: format!("deeper than {MAX_DEPTH} components, or too many components in all"),
            });
        }
        let mut parent = 0;
        let mut end = 0;
        for (i, name) in path.split('/').enumerate() {
            end += name.len() + usize::from(i > 0);
            let spelled = &path[..end];
            let last = i + 1 == depth;
            let next = self.nodes.len() + 1;
            let node = self.nodes.entry((parent, folded(name))).or_insert(Node {
                id: next,
                spelled,
                file: last && file,
            });
            if node.spelled != spelled {
                return Err(CollectionError::Collision {
                    a: node.spelled.into(),
                    b: spelled.into(),
                });
            }
            if node.file && !last {
                return Err(CollectionError::FileIsDir {
                    file: node.spelled.into(),
                    inner: path.into(),
                });
            }
            parent = node.id;
        }
        Ok(())
    }
}

impl Collection {
    /// A collection of `entries`, in any order (sorted here), without a pack.
    pub fn new(mut entries: Vec<Entry>) -> Collection {
        entries.sort_by(|a, b| a.path().cmp(b.path()));
        Collection {
            entries,
            pack: None,
        }
    }

    /// The files worth packing, in pack order: those smaller than [`PACK_MAX`], not empty,
    /// each content once. None unless there are at least two.
    pub fn packable(&self) -> Vec<&Entry> {
        let mut seen = std::collections::HashSet::new();
        let small: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| matches!(e, Entry::File { size, .. } if *size > 0 && *size < PACK_MAX))
            .filter(|e| e.file_id().is_some_and(|id| seen.insert(id)))
            .collect();
        if small.len() < 2 {
            return Vec::new();
        }
        small
    }

    /// Where each packed file lies in the pack: its entry and offset, in pack order.
    pub fn packed(&self) -> Vec<(&Entry, u64)> {
        let Some(pack) = &self.pack else {
            return Vec::new();
        };
        let by_path: HashMap<&str, &Entry> = self.entries.iter().map(|e| (e.path(), e)).collect();
        let mut offset = 0;
        let mut out = Vec::with_capacity(pack.files.len());
        for path in &pack.files {
            if let Some(&e) = by_path.get(path.as_str()) {
                out.push((e, offset));
                offset += e.size();
            }
        }
        out
    }

    /// The index's bytes (CBOR), what its manifest hashes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = ciborium::into_writer(self, &mut out);
        out
    }

    /// Reads an index and checks it ([`Self::validate`]).
    pub fn decode(bytes: &[u8]) -> Result<Collection, CollectionError> {
        let collection: Collection =
            ciborium::from_reader(bytes).map_err(|e| CollectionError::Decode(e.to_string()))?;
        collection.validate()?;
        Ok(collection)
    }

    /// Checks every entry: valid paths, sorted and unique, no file that is also another
    /// entry's directory, no two entries one file system would confuse, valid manifests.
    pub fn validate(&self) -> Result<(), CollectionError> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(CollectionError::TooManyEntries(self.entries.len()));
        }
        let mut files: HashSet<&str> = HashSet::new();
        let mut tree = Folded::default();
        let mut total: u64 = 0;
        let mut previous: Option<&str> = None;
        for entry in &self.entries {
            let path = entry.path();
            validate_path(path)?;
            if previous.is_some_and(|p| p >= path) {
                return Err(CollectionError::Order(path.into()));
            }
            previous = Some(path);
            if let Some(m) = entry.manifest() {
                m.validate().map_err(|source| CollectionError::File {
                    path: path.into(),
                    source,
                })?;
                total = total.checked_add(m.size).ok_or(CollectionError::TooLarge)?;
                files.insert(path);
            }
            tree.add(path, entry.manifest().is_some())?;
        }
        self.validate_pack(&files)
    }

    /// Checks the pack: a valid file, listing each of the collection's files at most once,
    /// whose sizes add up to its own.
    fn validate_pack(&self, files: &HashSet<&str>) -> Result<(), CollectionError> {
        let Some(pack) = &self.pack else {
            return Ok(());
        };
        let bad = |why: String| Err(CollectionError::Pack(why));
        pack.manifest()
            .validate()
            .map_err(|e| CollectionError::Pack(e.to_string()))?;
        let mut listed = HashSet::new();
        let sizes: HashMap<&str, u64> = self
            .entries
            .iter()
            .filter_map(|e| Some((e.path(), e.manifest()?.size)))
            .collect();
        for path in &pack.files {
            if !files.contains(path.as_str()) {
                return bad(format!("{path:?} is not one of its files"));
            }
            // Only small files are packed: each is cut out of the pack in one piece of memory.
            if !sizes
                .get(path.as_str())
                .is_some_and(|&n| n > 0 && n < PACK_MAX)
            {
                return bad(format!("{path:?} is empty or too large to be packed"));
            }
            if !listed.insert(path.as_str()) {
                return bad(format!("{path:?} is listed twice"));
            }
        }
        let total = self
            .packed()
            .iter()
            .map(|(e, _)| e.manifest().map_or(0, |m| m.size))
            .try_fold(0u64, u64::checked_add);
        match total {
            Some(total) if total == pack.size => {}
            Some(total) => {
                return bad(format!(
                    "its files add up to {total} bytes, not {}",
                    pack.size
                ))
            }
            None => return bad("its files add up to more than 2^64 bytes".into()),
        }
        Ok(())
    }

    /// Number of files.
    pub fn file_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e, Entry::File { .. }))
            .count()
    }

    /// Bytes in all files.
    pub fn total_size(&self) -> u64 {
        self.entries
            .iter()
            .map(Entry::size)
            .fold(0u64, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{sha256, HASH_LEN};

    fn file(path: &str, data: &[u8]) -> Entry {
        Entry::File {
            path: path.into(),
            executable: false,
            size: data.len() as u64,
            chunk_size: 1024,
            hashes: data.chunks(1024).flat_map(sha256).collect(),
        }
    }

    fn dir(path: &str) -> Entry {
        Entry::Dir { path: path.into() }
    }

    fn refused(entries: Vec<Entry>) -> CollectionError {
        let c = Collection {
            entries,
            pack: None,
        };
        let bytes = c.encode();
        Collection::decode(&bytes).expect_err("a hostile index must be refused")
    }

    #[test]
    fn a_tree_round_trips_and_a_member_has_its_alone_id() {
        let c = Collection::new(vec![
            file("b/c.txt", b"hello"),
            dir("empty"),
            file("a", b""),
            file("sp ace/ünï.bin", &[7u8; 3000]),
        ]);
        let back = Collection::decode(&c.encode()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.entries[0].path(), "a");
        assert_eq!(back.file_count(), 3);
        assert_eq!(back.total_size(), 3005);
        let alone = Manifest {
            name: "c.txt".into(),
            size: 5,
            chunk_size: 1024,
            hashes: sha256(b"hello").to_vec().into(),
            collection: false,
        };
        assert_eq!(back.entries[1].file_id(), Some(alone.file_id()));
    }

    #[test]
    fn a_members_manifest_holds_its_entrys_digests_not_a_copy() {
        let c =
            Collection::decode(&Collection::new(vec![file("f", &[3u8; 5000])]).encode()).unwrap();
        let Entry::File { hashes, .. } = &c.entries[0] else {
            panic!("a file entry");
        };
        let m = c.entries[0].manifest().unwrap();
        assert_eq!(m.hashes.len(), 5 * HASH_LEN);
        assert!(std::ptr::eq(m.hashes.as_ptr(), hashes.as_ptr()));
    }

    #[test]
    fn paths_that_could_leave_the_directory_are_refused() {
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "a/",
            "",
            "a\\..\\b",
            "nul\0byte",
            "bell\u{7}",
        ] {
            let e = refused(vec![file(bad, b"x")]);
            assert!(matches!(e, CollectionError::Path { .. }), "{bad:?}: {e}");
        }
        let long = "a/".repeat(MAX_PATH_LEN / 2) + "b";
        assert!(matches!(
            refused(vec![file(&long, b"x")]),
            CollectionError::Path { .. }
        ));
    }

    #[test]
    fn duplicates_collisions_and_a_file_used_as_a_directory_are_refused() {
        let e = refused(vec![file("a", b"1"), file("a", b"2")]);
        assert!(matches!(e, CollectionError::Order(_)), "{e}");
        let e = refused(vec![file("b", b"1"), file("a", b"2")]);
        assert!(matches!(e, CollectionError::Order(_)), "{e}");
        let e = refused(vec![file("x", b"1"), file("x/y", b"2")]);
        assert!(matches!(e, CollectionError::FileIsDir { .. }), "{e}");
        let e = refused(vec![file("x", b"1"), dir("x/y")]);
        assert!(matches!(e, CollectionError::FileIsDir { .. }), "{e}");
        let e = refused(vec![file("README", b"1"), file("readme", b"2")]);
        assert!(matches!(e, CollectionError::Collision { .. }), "{e}");
        // "é" precomposed and decomposed.
        let e = refused(vec![file("cafe\u{301}", b"1"), file("caf\u{e9}", b"2")]);
        assert!(matches!(e, CollectionError::Collision { .. }), "{e}");
        let e = refused(vec![file("D/a", b"1"), file("d/b", b"2")]);
        assert!(matches!(e, CollectionError::Collision { .. }), "{e}");
        // Equal only once upper-cased: the long s and the Kelvin sign.
        let e = refused(vec![file("mast", b"1"), file("maſt", b"2")]);
        assert!(matches!(e, CollectionError::Collision { .. }), "{e}");
        let e = refused(vec![file("kelvin", b"1"), file("\u{212a}elvin", b"2")]);
        assert!(matches!(e, CollectionError::Collision { .. }), "{e}");
        // Still apart: names no folding takes for one.
        Collection::new(vec![file("a\u{301}", b"1"), file("a", b"2"), file("i", b"3")])
            .validate()
            .unwrap();
        let e = refused(vec![Entry::File {
            path: "a".into(),
            executable: false,
            size: 10_000,
            chunk_size: 1024,
            hashes: vec![0; 32].into(),
        }]);
        assert!(matches!(e, CollectionError::File { .. }), "{e}");
        let e = Collection::decode(b"\xff\x00garbage").unwrap_err();
        assert!(matches!(e, CollectionError::Decode(_)), "{e}");
    }

    fn packed(entries: Vec<Entry>, files: &[&str], size: u64) -> Result<(), CollectionError> {
        let data = vec![1u8; size as usize];
        let c = Collection {
            entries,
            pack: Some(Pack {
                files: files.iter().map(|f| f.to_string()).collect(),
                size,
                chunk_size: 1024,
                hashes: data.chunks(1024).flat_map(sha256).collect(),
            }),
        };
        Collection::decode(&c.encode()).map(drop)
    }

    #[test]
    fn depth_is_bounded_and_a_deep_tree_costs_its_length() {
        let deep = vec!["d"; MAX_DEPTH].join("/");
        let e = refused(vec![file(&format!("{deep}/x"), b"1")]);
        assert!(e.to_string().contains("deeper than"), "{e}");
        // Many long paths, each as deep as allowed: checked node by node.
        let base = vec!["dir"; MAX_DEPTH - 1].join("/");
        let entries: Vec<Entry> = (0..2_000)
            .map(|i| file(&format!("{base}/f{i:05}"), b"1"))
            .collect();
        let c = Collection::new(entries);
        Collection::decode(&c.encode()).unwrap();
        // A collision deep down is still found.
        let e = refused(vec![
            file(&format!("{base}/Same"), b"1"),
            file(&format!("{base}/same"), b"2"),
        ]);
        assert!(matches!(e, CollectionError::Collision { .. }), "{e}");
    }

    #[test]
    fn a_pack_lists_each_file_once_and_adds_up() {
        let entries = || vec![file("a", b"12345"), file("b", b"678"), dir("d")];
        packed(entries(), &["b", "a"], 8).unwrap();
        let e = packed(entries(), &["a", "a"], 10).unwrap_err();
        assert!(matches!(e, CollectionError::Pack(_)), "{e}");
        let e = packed(entries(), &["a", "d"], 5).unwrap_err();
        assert!(matches!(e, CollectionError::Pack(_)), "{e}");
        let e = packed(entries(), &["a", "../x"], 5).unwrap_err();
        assert!(matches!(e, CollectionError::Pack(_)), "{e}");
        let e = packed(entries(), &["a", "b"], 9).unwrap_err();
        assert!(e.to_string().contains("add up"), "{e}");
        // A file too large to cut out in one piece cannot be packed, whatever its size says.
        let big = Entry::File {
            path: "big".into(),
            executable: false,
            size: PACK_MAX,
            chunk_size: 1 << 20,
            hashes: vec![0; 32].into(),
        };
        let e = packed(vec![file("a", b"12345"), big], &["a", "big"], 5 + PACK_MAX).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        let c = Collection::new(entries());
        assert_eq!(c.packable().len(), 2);
    }
}
