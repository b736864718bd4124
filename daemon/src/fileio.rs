//! File I/O with the platform's help where it has it: positioned reads and writes,
//! `sendfile`, direct I/O, early write-back, free space. Every OS-specific call of the daemon's
//! data path lives here, each with a portable fallback.

/// Positional read of exactly `buf.len()` bytes.
pub fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        if read_up_to_at(file, buf, offset)? < buf.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

/// Positional read into `buf` until it is full or the file ends; how many bytes were read.
pub fn read_up_to_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        #[cfg(unix)]
        let n = std::os::unix::fs::FileExt::read_at(file, &mut buf[done..], at);
        #[cfg(windows)]
        let n = std::os::windows::fs::FileExt::seek_read(file, &mut buf[done..], at);
        match n {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Positional write of all of `buf`.
pub fn write_all_at(file: &std::fs::File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            let n = std::os::windows::fs::FileExt::seek_write(
                file,
                &buf[done..],
                offset + done as u64,
            )?;
            done += n;
        }
        Ok(())
    }
}

/// Writes `bytes` as the whole content of the file at `path` (created, or emptied first; never
/// through a symbolic link) and returns its metadata. On Linux its 4 KiB-aligned head goes
/// with direct I/O, copied into `scratch`: a file written once need not fill the page cache
/// (on a virtual machine, page-cache pages never used before are slow to fill), and only the
/// tail is buffered.
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
pub fn write_whole(
    path: &std::path::Path,
    bytes: &[u8],
    scratch: &mut crate::aligned::AlignedBuf,
) -> std::io::Result<std::fs::Metadata> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let head = bytes.len() - bytes.len() % crate::aligned::ALIGN;
        let mut direct = options.clone();
        direct.custom_flags(libc::O_NOFOLLOW | libc::O_DIRECT);
        if let Some(file) = (head > 0).then(|| direct.open(path).ok()).flatten() {
            scratch.resize(head);
            scratch.copy_from_slice(&bytes[..head]);
            let rest = match write_all_at(&file, scratch, 0) {
                Ok(()) => head,
                // Refused after all (some file systems take the flag, not the write).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => 0,
                Err(e) => return Err(e),
            };
            buffered(&file)?;
            write_all_at(&file, &bytes[rest..], rest as u64)?;
            return file.metadata();
        }
    }
    let file = options.open(path)?;
    write_all_at(&file, bytes, 0)?;
    file.metadata()
}

/// Turns direct I/O off for `file`.
#[cfg(target_os = "linux")]
fn buffered(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `len` bytes of `file` from `offset` straight from the page cache to the socket
/// (`sendfile`: no copy through this process, no buffer). Waits for the socket as needed; a
/// read of data not in the page cache blocks this worker thread briefly.
#[cfg(target_os = "linux")]
pub async fn send_file(
    socket: &tokio::net::TcpStream,
    file: &std::fs::File,
    offset: u64,
    len: u32,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (out_fd, in_fd) = (socket.as_raw_fd(), file.as_raw_fd());
    let mut off = offset as libc::off_t;
    let mut left = len as usize;
    while left > 0 {
        socket.writable().await?;
        let sent = socket.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: both descriptors are open for the duration of the call; `off` is ours.
            let n = unsafe { libc::sendfile(out_fd, in_fd, &mut off, left) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match sent {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file is shorter than its manifest",
                ))
            }
            Ok(n) => left -= n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes available to us on the file system holding `dir`, where the platform tells.
pub fn available_space(dir: &std::path::Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: a NUL-terminated path and a buffer of the right type, both live across it.
        let r = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
        if r != 0 {
            return None;
        }
        // SAFETY: statvfs succeeded, so it filled the buffer.
        let st = unsafe { st.assume_init() };
        #[allow(clippy::unnecessary_cast)]
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// Opens `part` for writing with direct I/O, if the platform and file system allow it.
pub fn open_direct(part: &std::path::Path) -> Option<std::fs::File> {
    open_direct_as(part, std::fs::OpenOptions::new().write(true))
}

/// `path` opened for reading with direct I/O, where the file system allows: a file read
/// once, front to back, need not pass through the page cache.
pub fn open_direct_read(path: &std::path::Path) -> Option<std::fs::File> {
    open_direct_as(path, std::fs::OpenOptions::new().read(true))
}

/// `path` opened as `options` say, with `O_DIRECT` (Linux only: elsewhere `None`).
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
fn open_direct_as(
    path: &std::path::Path,
    options: &mut std::fs::OpenOptions,
) -> Option<std::fs::File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_DIRECT).open(path).ok()
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Asks the kernel to start writing a freshly written range to disk now, without waiting, so
/// that the committer's `fdatasync` finds little left to do (streaming writes otherwise pile
/// up as dirty pages and are flushed all at once).
pub fn start_writeback(file: &std::fs::File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a hint on a descriptor we own; no memory is passed.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}
