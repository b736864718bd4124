//! Opening a long-running program's sled database: the one rule `p2p-tracker` and `p2pd`
//! both follow.
//!
//! - A database whose lock another process holds is **in use**, never broken: it is waited
//!   for ([`LOCK_WAIT`]: an overlapping restart lets go within that), then reported as
//!   `another PROGRAM is using DIR (pid N)` and left exactly where it is.
//! - A database that cannot be opened for a reason of its surroundings (permissions, a
//!   read-only or full disk) is reported too, and left where it is.
//! - Only a database that we hold and that fails sled's own checks on opening (corruption,
//!   an unsupported format) is set aside, as `NAME.broken-SECONDS`, with an error-level log
//!   line, and a fresh one is started.
//!
//! sled takes its lock with `flock` on the file `db` inside the database directory; on Linux
//! the holder's PID is read from `/proc/locks`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::error;

/// A record as stored: CBOR.
pub fn to_cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Serializing our own plain records into a Vec cannot fail.
    let _ = ciborium::into_writer(value, &mut out);
    out
}

/// How long a locked database is waited for before it is reported as in use.
pub const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Why a database was not opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process holds the database's lock.
    #[error("another {program} is using {} ({holder})", dir.display())]
    InUse {
        program: String,
        dir: PathBuf,
        holder: Holder,
    },
    /// sled could not open it, for a reason that does not make it broken.
    #[error("opening database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// It was broken, and moving it aside failed.
    #[error("moving broken database {} aside: {source}", path.display())]
    SetAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The process holding a database's lock, as far as it can be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Pid(u32),
    Unknown,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Pid(pid) => write!(f, "pid {pid}"),
            Holder::Unknown => f.write_str("its pid could not be read"),
        }
    }
}

/// An opened database, and where a broken predecessor was moved, if one was.
pub struct Opened {
    pub db: sled::Db,
    pub set_aside: Option<PathBuf>,
}

/// Opens database `name` inside `dir` with the settings `configure` adds to a
/// [`sled::Config`] whose path is already set, following the rule in the module docs. `program` names the owner in the "in use" message. Blocks for up
/// to [`LOCK_WAIT`]: call it off the async executor.
pub fn open(
    program: &str,
    dir: &Path,
    name: &str,
    configure: impl Fn(sled::Config) -> sled::Config,
) -> Result<Opened, OpenError> {
    let path = dir.join(name);
    let open_once = || configure(sled::Config::new().path(&path)).open();
    let deadline = Instant::now() + LOCK_WAIT;
    let first = loop {
        match open_once() {
            Err(e) if is_locked(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => break other,
        }
    };
    let e = match first {
        Ok(db) => {
            return Ok(Opened {
                db,
                set_aside: None,
            })
        }
        Err(e) => e,
    };
    if is_locked(&e) {
        return Err(OpenError::InUse {
            program: program.to_string(),
            dir: dir.to_path_buf(),
            holder: lock_holder(&path),
        });
    }
    if is_environmental(&e) {
        return Err(OpenError::Open { path, source: e });
    }
    let aside = dir.join(format!(
        "{name}.broken-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    ));
    error!(
        error = %e,
        database = %path.display(),
        moved_to = %aside.display(),
        "DATABASE BROKEN: it failed its checks on opening; moved aside, starting a fresh one"
    );
    std::fs::rename(&path, &aside).map_err(|source| OpenError::SetAside {
        path: path.clone(),
        source,
    })?;
    let db = open_once().map_err(|source| OpenError::Open {
        path: path.clone(),
        source,
    })?;
    Ok(Opened {
        db,
        set_aside: Some(aside),
    })
}

/// Whether sled refused to open because another holder has the database's lock (it says so
/// only in its message).
pub fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Whether the error comes from the database's surroundings rather than its contents.
fn is_environmental(e: &sled::Error) -> bool {
    let sled::Error::Io(io) = e else {
        return false;
    };
    matches!(
        io.kind(),
        ErrorKind::PermissionDenied
            | ErrorKind::ReadOnlyFilesystem
            | ErrorKind::StorageFull
            | ErrorKind::QuotaExceeded
            | ErrorKind::NotFound
            | ErrorKind::NotADirectory
            | ErrorKind::OutOfMemory
    )
}

/// The PID holding the `flock` on the database's `db` file, read from `/proc/locks`.
pub fn lock_holder(db_dir: &Path) -> Holder {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(db_dir.join("db")) else {
            return Holder::Unknown;
        };
        let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
            return Holder::Unknown;
        };
        holder_in(&locks, meta.dev(), meta.ino())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = db_dir;
        Holder::Unknown
    }
}

/// Finds the holder of a lock on inode `ino` of device `dev` in the text of `/proc/locks`.
/// Lines look like `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`; waiters (`->`) are
/// skipped. Stacked filesystems (overlayfs) show the lower device: when no line matches both,
/// a single PID holding that inode is taken.
#[cfg(any(target_os = "linux", test))]
fn holder_in(locks: &str, dev: u64, ino: u64) -> Holder {
    let (major, minor) = split_dev(dev);
    let mut exact = None;
    let mut by_inode = Vec::new();
    for line in locks.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // id, kind, advisory, mode, pid, dev:ino, start, end
        if fields.len() < 6 || fields[1] == "->" {
            continue;
        }
        let Ok(pid) = fields[4].parse::<u32>() else {
            continue;
        };
        let mut parts = fields[5].split(':');
        let (Some(maj), Some(min), Some(i)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if i.parse::<u64>().ok() != Some(ino) {
            continue;
        }
        let same_dev = u64::from_str_radix(maj, 16).ok() == Some(major)
            && u64::from_str_radix(min, 16).ok() == Some(minor);
        if same_dev {
            exact.get_or_insert(pid);
        } else if !by_inode.contains(&pid) {
            by_inode.push(pid);
        }
    }
    match (exact, by_inode.as_slice()) {
        (Some(pid), _) => Holder::Pid(pid),
        (None, [pid]) => Holder::Pid(*pid),
        _ => Holder::Unknown,
    }
}

/// Major and minor numbers of a Linux `dev_t` (glibc's encoding).
#[cfg(any(target_os = "linux", test))]
fn split_dev(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(c: sled::Config) -> sled::Config {
        c.cache_capacity(1 << 20)
    }

    #[test]
    fn proc_locks_lines_give_the_holder() {
        let text = "1: POSIX  ADVISORY  WRITE 77 fd:01:99 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 5000 fd:01:1234 0 EOF\n";
        let dev = (0xfd << 8) | 0x01;
        assert_eq!(holder_in(text, dev, 1234), Holder::Pid(4242));
        // Another device, one holder of that inode: taken (overlayfs).
        assert_eq!(holder_in(text, 0x0802, 1234), Holder::Pid(4242));
        assert_eq!(holder_in(text, dev, 5), Holder::Unknown);
        assert_eq!(holder_in("garbage\n\n1: x", dev, 1234), Holder::Unknown);
    }

    #[test]
    fn a_locked_database_is_reported_with_its_holder_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let first = open("p2p-test", dir.path(), "x.sled", config).unwrap();
        first.db.insert("k", "v").unwrap();
        first.db.flush().unwrap();
        let started = Instant::now();
        let e = open("p2p-test", dir.path(), "x.sled", config)
            .err()
            .expect("a locked database must not open");
        assert!(started.elapsed() >= LOCK_WAIT, "waited for the lock first");
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!(
                "another p2p-test is using {}",
                dir.path().display()
            )),
            "{shown}"
        );
        if cfg!(target_os = "linux") {
            assert!(
                shown.contains(&format!("(pid {})", std::process::id())),
                "{shown}"
            );
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["x.sled"], "nothing moved");
        assert_eq!(first.db.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn a_broken_database_is_set_aside_and_a_fresh_one_started() {
        let dir = tempfile::tempdir().unwrap();
        {
            let o = open("p2p-test", dir.path(), "x.sled", config).unwrap();
            o.db.flush().unwrap();
        }
        // A configuration sled refuses to change across restarts: fails its checks.
        std::fs::write(
            dir.path().join("x.sled/conf"),
            b"segment_size: 1\nuse_compression: true\nversion: 0.34\nvQ\x00\x00\x00",
        )
        .unwrap();
        let o = open("p2p-test", dir.path(), "x.sled", config).unwrap();
        let aside = o.set_aside.expect("moved aside");
        assert!(aside.exists());
        assert!(aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("x.sled.broken-"));
    }
}
