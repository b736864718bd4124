//! Hashing a local file into a [`Manifest`], as a stream in large blocks, on a blocking
//! thread. The file is never loaded whole into memory and never copied.

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

use crate::local::Identity;
use p2p_schema::{
    auto_chunk_size, validate_chunk_size, validate_name, ErrorCode, Manifest, ManifestBuilder,
    WireError,
};

/// Bytes read per block while hashing.
const BLOCK: usize = 1 << 20;
// A collection's pack is made from the bytes of files read at once (`hash_file_keeping`):
// every file small enough to be packed must be.
const _: () = assert!(p2p_schema::PACK_MAX <= BLOCK as u64);

/// A hashed file, ready to share.
pub struct Hashed {
    pub manifest: Manifest,
    /// The file, open for serving.
    pub file: File,
    /// The file's identity as hashed, to notice later changes.
    pub identity: Identity,
}

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> WireError {
    move |e| WireError::new(ErrorCode::Io, format!("{what}: {e}"))
}

/// The file's name as it will be shared: its last path component, checked.
pub fn share_name(path: &Path) -> Result<String, WireError> {
    let name = path
        .file_name()
        .ok_or_else(|| {
            WireError::new(
                ErrorCode::BadRequest,
                format!("{} does not name a file", path.display()),
            )
        })?
        .to_str()
        .ok_or_else(|| {
            WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "{}: file names that are not valid UTF-8 cannot be shared; rename the file",
                    path.display()
                ),
            )
        })?;
    validate_name(name).map_err(|e| WireError::new(ErrorCode::BadRequest, e.to_string()))?;
    Ok(name.to_string())
}

/// Opens `path` and checks it is a regular, readable file.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), WireError> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            WireError::new(ErrorCode::NotFound, format!("{shown}: no such file"))
        } else {
            WireError::new(ErrorCode::Io, format!("{shown}: {e}"))
        }
    })?;
    if meta.is_dir() {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("{shown} is a directory, not a regular file"),
        ));
    }
    if !meta.is_file() {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("{shown} is not a regular file"),
        ));
    }
    let file = File::open(path).map_err(io_error(format!("cannot read {shown}")))?;
    Ok((file, meta))
}

/// Reads into `block` until it is full or the file ends; the number of bytes read.
fn read_full(file: &mut File, block: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < block.len() {
        match file.read(&mut block[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Hashes the file at `path` (blocking). `progress(done, total)` is called after each block.
pub fn hash_file(
    path: &Path,
    name: String,
    chunk_size: Option<u32>,
    progress: impl FnMut(u64, u64),
) -> Result<Hashed, WireError> {
    hash_file_keeping(path, name, chunk_size, progress).map(|(hashed, _)| hashed)
}

/// Like [`hash_file`], and also gives the bytes hashed of a file small enough to be read at
/// once (up to 1 MiB): the pack of a collection is written from them, without reading the
/// file again.
pub fn hash_file_keeping(
    path: &Path,
    name: String,
    chunk_size: Option<u32>,
    mut progress: impl FnMut(u64, u64),
) -> Result<(Hashed, Option<Vec<u8>>), WireError> {
    let (mut file, before) = open_regular(path)?;
    let size = before.len();
    let chunk_size = chunk_size.unwrap_or_else(|| auto_chunk_size(size));
    validate_chunk_size(chunk_size)
        .map_err(|e| WireError::new(ErrorCode::BadRequest, e.to_string()))?;
    let mut builder = ManifestBuilder::new(chunk_size);
    if size <= BLOCK as u64 {
        // A small file (a tree may hold thousands): read at once, no reader thread.
        let mut block = vec![0u8; size as usize + 1];
        let n = read_full(&mut file, &mut block)
            .map_err(io_error(format!("reading {}", path.display())))?;
        builder.update(&block[..n]);
        progress(builder.size(), size);
        block.truncate(n);
        return finish_hash(path, file, before, builder, name).map(|h| (h, Some(block)));
    }
    // One thread reads the next blocks while this one hashes the last: reading (a copy out of
    // the page cache, or the disk) overlaps hashing, the bound.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(3);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..4 {
        let _ = empty_tx.send(vec![0u8; BLOCK]);
    }
    let reader = &mut file;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            // Ends when the file does, on an error, or when the hasher stops taking blocks.
            while let Ok(mut block) = empty_rx.recv() {
                block.resize(BLOCK, 0);
                let read = read_full(reader, &mut block).map(|n| {
                    block.truncate(n);
                    block
                });
                let end = matches!(&read, Ok(b) if b.is_empty()) || read.is_err();
                if full_tx.send(read).is_err() || end {
                    return;
                }
            }
        });
        // Owned here, so that however this ends they are dropped, which ends the reader.
        let (full_rx, empty_tx) = (full_rx, empty_tx);
        for read in full_rx.iter() {
            let block = read.map_err(io_error(format!("reading {}", path.display())))?;
            if block.is_empty() {
                break;
            }
            builder.update(&block);
            progress(builder.size(), size);
            if builder.size() > size {
                break;
            }
            let _ = empty_tx.send(block);
        }
        Ok::<(), WireError>(())
    })?;
    finish_hash(path, file, before, builder, name).map(|h| (h, None))
}

/// Checks that the file hashed did not change meanwhile, and makes its manifest.
fn finish_hash(
    path: &Path,
    file: File,
    before: Metadata,
    builder: ManifestBuilder,
    name: String,
) -> Result<Hashed, WireError> {
    let size = before.len();
    let after = file
        .metadata()
        .map_err(io_error(format!("reading {}", path.display())))?;
    let identity = Identity::of(&before);
    if builder.size() != size || identity.change(&Identity::of(&after)).is_some() {
        return Err(WireError::new(
            ErrorCode::Io,
            format!(
                "{} changed while it was being hashed; try again once it is no longer being written",
                path.display()
            ),
        ));
    }
    let manifest = builder.finish(name);
    manifest
        .validate()
        .map_err(|e| WireError::new(ErrorCode::BadRequest, e.to_string()))?;
    Ok(Hashed {
        manifest,
        file,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_rejects_what_it_must() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let mut calls = 0;
        let h = hash_file(&p, "a.bin".into(), Some(1024), |_, _| calls += 1).unwrap();
        assert_eq!(h.manifest.chunk_count(), 10);
        assert_eq!(h.identity.size, 10_000);
        assert!(calls >= 1);

        let e = hash_file(dir.path(), "x".into(), None, |_, _| {})
            .err()
            .unwrap();
        assert!(e.message.contains("directory"), "{e}");
        let e = hash_file(&dir.path().join("missing"), "x".into(), None, |_, _| {})
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::NotFound);
        let e = hash_file(&p, "a.bin".into(), Some(1), |_, _| {})
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::BadRequest);

        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let h = hash_file(&empty, "empty".into(), None, |_, _| {}).unwrap();
        assert_eq!(h.manifest.chunk_count(), 0);
    }

    #[test]
    fn names() {
        assert_eq!(share_name(Path::new("/x/doug.png")).unwrap(), "doug.png");
        assert!(share_name(Path::new("/")).is_err());
    }
}
