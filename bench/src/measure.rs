//! Timing, memory and process helpers shared by every scenario.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The median of a sample (NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs `once` `reps` times (it gets the repetition's number and returns the seconds taken
/// and the leecher's peak RSS), one progress dot each; the median time, the largest leecher
/// RSS, and the largest peak RSS among `servers` (PIDs, read after the last repetition).
pub fn repeat(
    reps: usize,
    servers: &[u32],
    mut once: impl FnMut(usize) -> Result<(f64, f64), String>,
) -> Result<crate::Sample, String> {
    let mut times = Vec::new();
    let mut leecher_rss: f64 = 0.0;
    for rep in 0..reps {
        let (t, rss) = once(rep)?;
        times.push(t);
        leecher_rss = leecher_rss.max(rss);
        crate::tick();
    }
    let seeder_rss = servers
        .iter()
        .map(|&pid| peak_rss_mib(pid))
        .fold(f64::NAN, f64::max);
    Ok(crate::Sample {
        seconds: median(times),
        leecher_rss,
        seeder_rss,
    })
}

/// Peak resident memory (VmHWM) of a live process, in MiB; NaN if it cannot be read.
pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Runs `cmd` to completion, its output going to `log`; returns the seconds from spawn to
/// exit and the child's peak RSS in MiB. Fails on a non-zero exit or after `limit`.
///
/// The peak is the child's `VmHWM`, read every 2 ms while it runs: `wait4`'s `ru_maxrss`
/// would include the memory of this process, which the child was forked from.
pub fn run_timed(mut cmd: Command, log: &Path, limit: Duration) -> Result<(f64, f64), String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("starting {cmd:?}: {e}"))?;
    let mut rss: f64 = 0.0;
    let status = loop {
        let now = peak_rss_mib(child.id());
        if !now.is_nan() {
            rss = rss.max(now);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} took longer than {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        return Err(format!(
            "{cmd:?} failed ({status}): {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    Ok((seconds, rss))
}

/// A TCP port free on loopback right now (also used inside namespaces, where every port is
/// free).
pub fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `check` every 50 ms for up to `timeout`; whether it ever returned true.
pub fn poll(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Whether `program` is on the PATH.
pub fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}
