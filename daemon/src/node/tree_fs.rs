//! The blocking file-system steps of a collection's download: laying out its directories,
//! copying files fetched once to their other places, setting modes, the final rename, and
//! checking a tree found in place.

use p2p_schema::{Collection, Entry};

use super::tree::{io, Tree, SCRATCH};
use super::*;
use crate::local::Identity;
use crate::part::PlaceError;

/// Checks (blocking) that every file of `collection` under `root` holds the bytes the index
/// names: hashed anew.
pub(super) fn verify_in_place(root: &Path, collection: &Collection) -> Result<(), WireError> {
    for e in &collection.entries {
        let Some(m) = e.manifest() else { continue };
        let path = root.join(e.path());
        let hashed =
            crate::register::hash_file(&path, m.name.clone(), Some(m.chunk_size), |_, _| {})?;
        if hashed.manifest.file_id() != m.file_id() {
            return Err(err(
                ErrorCode::Io,
                format!(
                    "{} is not what the collection lists; download it again elsewhere",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// A file found whole at `dest` with no record of it (a crash lost them): its identity if it
/// holds exactly `manifest`'s bytes (hashed anew); otherwise it is removed (it lies in this
/// daemon's own directory) and `None` returned (blocking).
pub(super) fn adopt(dest: &Path, manifest: &Manifest) -> Result<Option<Identity>, WireError> {
    let regular = std::fs::symlink_metadata(dest).is_ok_and(|m| m.is_file());
    let hashed = regular.then(|| {
        crate::register::hash_file(
            dest,
            manifest.name.clone(),
            Some(manifest.chunk_size),
            |_, _| {},
        )
    });
    match hashed {
        Some(Ok(h)) if h.manifest.file_id() == manifest.file_id() => Ok(Some(h.identity)),
        _ => {
            std::fs::remove_file(dest).map_err(io(format!("removing {}", dest.display())))?;
            Ok(None)
        }
    }
}

/// Creates the tree's directories and empty files under `part` (blocking). Every path was
/// checked ([`Collection::decode`]); none is followed through a symbolic link.
pub(super) fn lay_out(part: &Path, collection: &Collection) -> Result<(), WireError> {
    ensure_dir(part, &part.join(SCRATCH))?;
    for e in &collection.entries {
        let path = part.join(e.path());
        match e {
            Entry::Dir { .. } => ensure_dir(part, &path)?,
            Entry::File { size, .. } => {
                if let Some(parent) = path.parent() {
                    ensure_dir(part, parent)?;
                }
                if *size == 0 {
                    match std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                    {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(io(format!("creating {}", path.display()))(e)),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Makes `dir` (under `root`) a directory, refusing to go through anything that is not one.
pub(super) fn ensure_dir(root: &Path, dir: &Path) -> Result<(), WireError> {
    let Ok(rel) = dir.strip_prefix(root) else {
        return Err(err(
            ErrorCode::Internal,
            format!("{} is outside {}", dir.display(), root.display()),
        ));
    };
    let mut at = root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(err(
                    ErrorCode::Io,
                    format!("{} is in the way of a directory", at.display()),
                ))
            }
            Err(_) => std::fs::create_dir(&at).map_err(io(format!("creating {}", at.display())))?,
        }
    }
    Ok(())
}

/// Copies `from` to `to` through a temporary name, synced (blocking).
pub(super) fn copy_into(from: &Path, to: &Path, scratch: &Path) -> Result<(), WireError> {
    let temp = scratch.join(format!("{}.copy", fastrand::u64(..)));
    std::fs::copy(from, &temp).map_err(io(format!(
        "copying {} to {}",
        from.display(),
        temp.display()
    )))?;
    std::fs::File::open(&temp)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("syncing {}", temp.display())))?;
    std::fs::rename(&temp, to).map_err(io(format!("renaming {}", temp.display())))
}

/// Copies the files whose content was fetched once to their other places, sets the
/// executable bits, and renames the tree into place (blocking).
pub(super) fn finish_tree(
    part: &Path,
    output: &Path,
    collection: &Collection,
    done: &HashMap<FileId, PathBuf>,
    tree: &Tree,
) -> Result<(), WireError> {
    for e in &collection.entries {
        let Entry::File {
            path,
            executable,
            size,
            ..
        } = e
        else {
            continue;
        };
        let dest = part.join(path);
        if *size > 0 && !dest.exists() {
            let first = e
                .file_id()
                .and_then(|id| done.get(&id))
                .ok_or_else(|| err(ErrorCode::Internal, format!("{path} was never fetched")))?;
            copy_into(first, &dest, &part.join(SCRATCH))?;
            tree.advance(|p| {
                p.files_done += 1;
                p.bytes_done += size;
            });
        }
        set_executable(&dest, *executable)?;
    }
    // Empty by now; it must not be part of the tree.
    let scratch = part.join(SCRATCH);
    std::fs::remove_dir_all(&scratch).map_err(io(format!("removing {}", scratch.display())))?;
    crate::part::place(part, output).map_err(|e| match e {
        PlaceError::Appeared => err(
            ErrorCode::Io,
            format!(
                "{} appeared while downloading; the tree is kept at {}",
                output.display(),
                part.display()
            ),
        ),
        PlaceError::Io(e) => io(format!(
            "renaming {} to {}",
            part.display(),
            output.display()
        ))(e),
    })
}

#[cfg(unix)]
pub(super) fn set_executable(path: &Path, executable: bool) -> Result<(), WireError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(io(format!("reading {}", path.display())))?;
    let mode = meta.permissions().mode();
    let want = if executable {
        mode | ((mode & 0o444) >> 2)
    } else {
        mode & !0o111
    };
    if want != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))
            .map_err(io(format!("setting the mode of {}", path.display())))?;
    }
    Ok(())
}

#[cfg(not(unix))]
pub(super) fn set_executable(_: &Path, _: bool) -> Result<(), WireError> {
    Ok(())
}
