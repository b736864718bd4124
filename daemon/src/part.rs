//! A download's partial file and its output path: created exclusively, renamed into place
//! without ever replacing a file (see `daemon/STATE.md`, "Output paths").

use std::fs::File;
use std::io;
use std::path::Path;

use p2p_schema::{ErrorCode, WireError};

/// Creates `part` for a download of `size` bytes: exclusively (`O_CREAT | O_EXCL`, and
/// `O_NOFOLLOW`: never through a symlink), so two downloads can never share a partial file,
/// and at full size (sparse where the file system allows).
pub fn create_part(part: &Path, size: u64) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    let file = options.open(part)?;
    if let Err(e) = file.set_len(size) {
        // Ours, just made: nobody else has it.
        let _ = std::fs::remove_file(part);
        return Err(e);
    }
    Ok(file)
}

/// Reopens an existing partial file for reading and writing, never through a symlink.
pub fn open_part(part: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    options.open(part)
}

/// The error for a partial file that could not be created.
pub fn part_error(part: &Path, output: &Path, e: io::Error) -> WireError {
    if e.kind() == io::ErrorKind::AlreadyExists {
        return WireError::new(
            ErrorCode::BadRequest,
            format!(
                "{} already exists: another download is writing {} (or one that failed left \
                 it; see 'p2pctl status'); choose another --output, or remove it",
                part.display(),
                output.display()
            ),
        );
    }
    WireError::new(
        ErrorCode::Io,
        format!("cannot create {}: {e}", part.display()),
    )
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`): atomically where the
/// platform and file system allow (`renameat2(RENAME_NOREPLACE)` on Linux), else by a check
/// just before the rename.
pub fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
        };
        let (f, t) = (c(from)?, c(to)?);
        // SAFETY: two NUL-terminated paths that live across the call.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // Not supported by this file system (or kernel): fall back to check-then-rename.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    if to.symlink_metadata().is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists", to.display()),
        ));
    }
    std::fs::rename(from, to)
}

/// Why finished data could not be renamed into place.
pub enum PlaceError {
    /// Something appeared at the final name meanwhile; it is left alone.
    Appeared,
    Io(std::io::Error),
}

/// Renames `part` to `output`, never replacing anything there, and makes the rename durable.
pub fn place(part: &Path, output: &Path) -> Result<(), PlaceError> {
    rename_no_replace(part, output).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PlaceError::Appeared
        } else {
            PlaceError::Io(e)
        }
    })?;
    sync_parent(output);
    Ok(())
}

/// Makes a rename into `path`'s directory durable (best effort: not every platform can sync
/// a directory).
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_is_never_shared_followed_or_renamed_over_a_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let part = dir.path().join("x.part");
        let f = create_part(&part, 4096).expect("first");
        assert_eq!(f.metadata().expect("stat").len(), 4096);
        let again = create_part(&part, 10).expect_err("a second download of one part");
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(
            std::fs::metadata(&part).expect("stat").len(),
            4096,
            "untouched"
        );
        #[cfg(unix)]
        {
            let target = dir.path().join("elsewhere");
            std::fs::write(&target, b"keep").expect("write");
            let link = dir.path().join("link.part");
            std::os::unix::fs::symlink(&target, &link).expect("symlink");
            assert!(create_part(&link, 10).is_err());
            assert!(open_part(&link).is_err(), "never through a symlink");
            assert_eq!(std::fs::read(&target).expect("read"), b"keep");
        }
        let out = dir.path().join("x");
        std::fs::write(&out, b"someone else's").expect("write");
        let e = rename_no_replace(&part, &out).expect_err("an existing output");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&out).expect("read"), b"someone else's");
        std::fs::remove_file(&out).expect("remove");
        rename_no_replace(&part, &out).expect("a free output");
        assert!(!part.exists());
    }
}
