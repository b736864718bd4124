//! After an unclean stop: find chunks whose bytes reached a partial file but were not yet
//! recorded in sled (the last commit batch before the crash), and re-verify them against
//! their hashes instead of either trusting or refetching them.
//!
//! Only regions that hold data are read: on file systems with sparse files, the holes (chunks
//! never written) are skipped with `SEEK_DATA` / `SEEK_HOLE`.

use std::fs::File;

use p2p_schema::{sha256, Bitfield, Manifest};

use crate::fileio::read_exact_at;

/// What the scan found among the chunks not recorded as held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Chunks whose bytes on disk match their hash: held after all.
    pub good: Vec<u32>,
    /// Chunks with some bytes on disk that do not match (a torn write): fetched again.
    pub torn: Vec<u32>,
}

/// Byte ranges of `file` (of length `len`) that may hold data, in order.
fn data_ranges(file: &File, len: u64) -> Vec<(u64, u64)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let mut out = Vec::new();
        let mut offset: u64 = 0;
        while offset < len {
            // SAFETY: lseek on a file descriptor we own; no memory is touched.
            let start = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
            if start < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data past `offset`
                }
                return vec![(0, len)]; // SEEK_DATA unsupported: treat all as data
            }
            // SAFETY: as above.
            let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
            let end = if end < 0 { len as i64 } else { end };
            out.push((start as u64, (end as u64).min(len)));
            offset = end as u64;
        }
        out
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        vec![(0, len)]
    }
}

/// Re-verifies every chunk of `file` not in `have` that has bytes on disk (blocking).
pub fn scan(manifest: &Manifest, file: &File, have: &Bitfield) -> std::io::Result<Recovered> {
    let ranges = data_ranges(file, manifest.size);
    let mut out = Recovered::default();
    let mut buf = Vec::new();
    for index in 0..manifest.chunk_count() {
        if have.get(index) {
            continue;
        }
        let Some((offset, len)) = manifest.chunk_range(index) else {
            continue;
        };
        let end = offset + u64::from(len);
        if !ranges.iter().any(|&(a, b)| a < end && offset < b) {
            continue;
        }
        buf.resize(len as usize, 0);
        read_exact_at(file, &mut buf, offset)?;
        if manifest.hash(index) == Some(&sha256(&buf)) {
            out.good.push(index);
        } else if buf.iter().any(|&b| b != 0) {
            out.torn.push(index);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_schema::ManifestBuilder;
    use std::io::Write;

    #[test]
    fn finds_written_chunks_and_torn_ones() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut b = ManifestBuilder::new(1024);
        b.update(&data);
        let m = b.finish("f".into());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.part");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(8192).unwrap();
        // Chunk 1 recorded, chunk 3 written whole, chunk 5 half written, the rest holes.
        crate::fileio::write_all_at(&file, &data[1024..2048], 1024).unwrap();
        crate::fileio::write_all_at(&file, &data[3072..4096], 3072).unwrap();
        crate::fileio::write_all_at(&file, &data[5120..5632], 5120).unwrap();
        (&file).flush().unwrap();
        let mut have = Bitfield::new(8);
        have.set(1);
        let r = scan(&m, &file, &have).unwrap();
        assert_eq!(r.good, vec![3]);
        assert_eq!(r.torn, vec![5]);
    }
}
