//! A program's long-lived key pair on disk: created on first start (mode 0600 on Unix), read
//! on every start after. A file that exists but cannot be read as a key is an error, never a
//! reason to make a new identity silently.
//!
//! The file is two lines of text: a header naming the format, and the private key in hex.
//! Also the swarm key, from `--secret` or `--secret-file`.

use std::io::Write;
use std::path::{Path, PathBuf};

use p2p_schema::secure::{Keypair, SwarmKey};

/// The key of the swarm whose secret is given (`--secret`) or in a file (`--secret-file`,
/// its first line); `None` for an open swarm. The flag wins over the file.
pub fn swarm_key(
    secret: Option<&crate::Secret>,
    file: Option<&Path>,
) -> Result<Option<SwarmKey>, String> {
    match (secret, file) {
        (Some(s), _) => Ok(Some(SwarmKey::from_secret(s.expose()))),
        (None, Some(path)) => crate::read_secret(path).map(|s| Some(SwarmKey::from_secret(&s))),
        (None, None) => Ok(None),
    }
}

/// The first line of a key file.
const HEADER: &str = "p2p identity key v1";

/// Why the key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the key file {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("writing the key file {0}: {1}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error(
        "the key file {0} is corrupt ({1}); restore it from a backup, or delete it to start \
         over with a new identity (other peers and pinned trackers will see a new key)"
    )]
    Corrupt(PathBuf, &'static str),
    #[error("generating a key: {0}")]
    Generate(String),
}

/// The key pair in `path`, made and stored there if the file does not exist yet. The second
/// value says whether it was made now.
pub fn load_or_create(path: &Path) -> Result<(Keypair, bool), KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text)
            .map(|k| (k, false))
            .map_err(|why| KeyError::Corrupt(path.to_path_buf(), why)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate().map_err(|e| KeyError::Generate(e.to_string()))?;
            store(path, &key)?;
            Ok((key, true))
        }
        Err(e) => Err(KeyError::Read(path.to_path_buf(), e)),
    }
}

fn parse(text: &str) -> Result<Keypair, &'static str> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err("it does not start with the key header");
    }
    let hex_key = lines.next().ok_or("no key after the header")?.trim();
    let private = hex::decode(hex_key).map_err(|_| "the key is not hex")?;
    if private.len() != 32 {
        return Err("the key is not 32 bytes");
    }
    Keypair::from_private(&private).map_err(|_| "the key is not a valid private key")
}

/// Writes the key to a temporary file readable by its owner only, then moves it into place
/// without replacing a key another process wrote meanwhile.
fn store(path: &Path, key: &Keypair) -> Result<(), KeyError> {
    let werr = |e| KeyError::Write(path.to_path_buf(), e);
    let tmp = path.with_extension("key.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&tmp).map_err(werr)?;
    writeln!(f, "{HEADER}\n{}", hex::encode(key.private())).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    drop(f);
    // A hard link fails if the key appeared meanwhile: then the other process's key wins.
    match std::fs::hard_link(&tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(werr(e));
        }
    }
    let _ = std::fs::remove_file(&tmp);
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let (a, made) = load_or_create(&path).unwrap();
        assert!(made);
        let (b, made) = load_or_create(&path).unwrap();
        assert!(!made);
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_corrupt_key_is_an_error_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        for bad in [
            "",
            "garbage",
            "p2p identity key v1\nzz",
            "p2p identity key v1\nabcd",
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = load_or_create(&path).unwrap_err();
            assert!(matches!(e, KeyError::Corrupt(..)), "{bad:?}: {e}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), bad);
        }
    }
}
