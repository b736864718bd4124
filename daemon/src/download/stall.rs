//! A download stalled by a write error: why, and when it may go on.

use super::*;

/// Bytes of `dl` not held yet.
pub(super) fn missing_bytes(dl: &Download) -> u64 {
    let have = dl.local.have();
    (0..dl.manifest.chunk_count())
        .filter(|&i| !have.get(i))
        .filter_map(|i| dl.manifest.chunk_range(i))
        .map(|(_, len)| u64::from(len))
        .sum()
}

/// The line `status` and an attached `p2pctl download` show for a stall.
pub(super) fn stall_reason(dl: &Download, e: &WriteError) -> String {
    if e.is_full() {
        let missing = missing_bytes(dl);
        let free = available_space(&e.dir).unwrap_or(0);
        format!(
            "no space left on device at {} (needs {} more); free space or 'p2pctl resume'",
            e.dir.display(),
            p2p_service::HumanBytes(missing.saturating_sub(free).max(1))
        )
    } else {
        format!(
            "{e}; retrying every {}s, or 'p2pctl resume'",
            STALL_RETRY.as_secs()
        )
    }
}

/// How often a download stalled by a write error other than a full disk tries again.
pub(super) const STALL_RETRY: Duration = Duration::from_secs(10);

/// Waits until a stalled download may go on: space freed for what it still needs (a full
/// disk), [`STALL_RETRY`] passed (other errors), or `resume`. Returns false if it was
/// stopped meanwhile.
pub(super) async fn wait_to_go_on(dl: &Download, e: &WriteError, stop: &CancellationToken) -> bool {
    let started = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return false,
            () = dl.retry.notified() => return true,
            () = tokio::time::sleep(STALL_RECHECK) => {}
        }
        let ready = if e.is_full() {
            // Enough for what is missing, or at least a good stretch of it.
            let wanted = missing_bytes(dl).min(64 << 20);
            available_space(&e.dir).is_some_and(|free| free >= wanted)
        } else {
            started.elapsed() >= STALL_RETRY
        };
        if ready {
            return true;
        }
    }
}
