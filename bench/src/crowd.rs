//! Flash crowds: one seeder and N leechers started together, every uplink capped. Ours beside
//! aria2c over BitTorrent (opentracker) in the same set-up and the same run: one leecher
//! alone first, then the crowd; the slowest leecher against the one alone, and how many
//! copies of the file the seeder sent to the crowd.

use std::path::Path;
use std::time::{Duration, Instant};

use p2p_tests::Proc;

use crate::lab::Net;
use crate::measure::{free_port, peak_rss_mib, poll, run_timed};
use crate::others::{aria2_bt_flags, BtTracker};
use crate::{ours, scratch, settle, MIB};

/// What one seeder and N leechers started together measured.
pub struct Crowd {
    pub alone: f64,
    pub slowest: f64,
    pub fastest: f64,
    pub seeder_rss: f64,
    /// Bytes the seeder sent to the crowd, over the file's size: 1.0 means every chunk left
    /// it once (the leecher that went alone is not counted).
    pub seeder_sent: f64,
}

/// The crowd as the fleet-scale issue measures it, on loopback: every uplink capped at
/// [`CAPPED_RATE`] with `--upload-rate` (aria2c: `--max-overall-upload-limit`), 64 MiB (16
/// with `--quick`), 10 and then 40 leechers. Returns the summary lines.
pub fn capped(base: &Path, files: &Path, quick: bool, run_others: bool) -> Vec<String> {
    let size = if quick { 16 * MIB } else { 64 * MIB };
    let file = files.join(format!("capped-crowd-{}m.bin", size / MIB));
    p2p_tests::write_random(&file, size as usize, 11);
    settle(&file);
    let rate = CAPPED_RATE.to_string();
    let mut lines = Vec::new();
    for n in [10, 40] {
        let net = Net::loopback(n + 2);
        eprint!("capped crowd, ours, 1 seeder -> {n} leechers ");
        let c = ours::crowd(
            &net,
            &scratch(base, "capped-crowd"),
            &file,
            n,
            &["--upload-rate", &rate],
        );
        eprintln!();
        lines.push(line(&label(), "ours", n, size, &c));
        if !run_others {
            continue;
        }
        eprint!("capped crowd, aria2c BitTorrent, 1 seeder -> {n} leechers ");
        match bittorrent(
            &net,
            &scratch(base, "capped-crowd-bt"),
            &file,
            n,
            CAPPED_RATE,
        ) {
            Ok(c) => lines.push(line(&label(), "aria2c BitTorrent", n, size, &c)),
            Err(e) => lines.push(format!("aria2c BitTorrent crowd of {n} failed: {e}")),
        }
        eprintln!();
    }
    lines
}

/// Bytes per second of every uplink in [`capped`].
pub const CAPPED_RATE: u64 = 2_500_000;

fn label() -> String {
    format!(
        "{:.1} MB/s uplinks emulated on loopback",
        CAPPED_RATE as f64 / 1e6
    )
}

/// One summary line.
pub fn line(label: &str, tool: &str, n: usize, size: u64, c: &Crowd) -> String {
    format!(
        "{label}, {tool}, 1 seeder -> {n} leechers, {} MiB: one leecher alone {:.2} s; {n} \
         started together: fastest {:.2} s, slowest {:.2} s = {:.2}x alone (without leechers \
         feeding each other: about {n}x); the seeder sent the file {:.2} times to the {n}; \
         seeder peak RSS {:.0} MiB",
        size / MIB,
        c.alone,
        c.fastest,
        c.slowest,
        c.slowest / c.alone,
        c.seeder_sent,
        c.seeder_rss
    )
}

/// aria2c over BitTorrent in the same crowd: an aria2c seeder on host 0 (its upload read
/// over its RPC interface), one leecher alone on host 1 (exits when done), then `n` leechers
/// on hosts 2.. that keep seeding once done (as ours do); each one's time is until aria2c
/// runs its `--on-bt-download-complete` hook (every piece in and checked). Every uplink
/// capped at `rate`.
pub fn bittorrent(
    net: &Net,
    dir: &Path,
    file: &Path,
    n: usize,
    rate: u64,
) -> Result<Crowd, String> {
    // Pieces of 128 KiB: the chunk size ours picks for 64 MiB.
    let tracker = BtTracker::start(&net.hub, &dir.join("opentracker"), file, 17)?;
    let name = file.file_name().ok_or("file has no name")?;
    let limit = format!("--max-overall-upload-limit={rate}");
    let seed_dir = dir.join("bt-seed");
    std::fs::create_dir_all(&seed_dir).map_err(|e| e.to_string())?;
    std::fs::hard_link(file, seed_dir.join(name)).map_err(|e| format!("hard link: {e}"))?;
    let rpc = free_port();
    let mut cmd = net.hosts[0].command("aria2c");
    cmd.args(aria2_bt_flags(free_port()))
        .args(["--seed-ratio=0.0", "--bt-seed-unverified=true", &limit])
        .args(["--enable-rpc", &format!("--rpc-listen-port={rpc}")])
        .arg(format!("--dir={}", seed_dir.display()))
        .arg(&tracker.torrent);
    let seeder = Proc::spawn("aria2c seeder", cmd);
    if !poll(Duration::from_secs(20), || tracker.seeders(&net.hub) >= 1) {
        return Err("the aria2c seeder never announced".into());
    }
    let alone = {
        let out = dir.join("bt-alone");
        let mut cmd = net.hosts[1].command("aria2c");
        cmd.args(aria2_bt_flags(free_port()))
            .args(["--seed-time=0", "--file-allocation=falloc", &limit])
            .arg(format!("--dir={}", out.display()))
            .arg(&tracker.torrent);
        let (t, _) = run_timed(cmd, &dir.join("aria2c-alone.log"), Duration::from_secs(600))?;
        let _ = std::fs::remove_dir_all(&out);
        t
    };
    crate::tick();
    let sent_before = uploaded(net, rpc)?;
    let times = leech_together(net, dir, &tracker, n, &limit, name)?;
    crate::tick();
    let sent = uploaded(net, rpc)? - sent_before;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(1) as f64;
    Ok(Crowd {
        alone,
        slowest: times.iter().cloned().fold(0.0, f64::max),
        fastest: times.iter().cloned().fold(f64::INFINITY, f64::min),
        seeder_rss: peak_rss_mib(seeder.pid()),
        seeder_sent: sent / size,
    })
}

/// Starts `n` aria2c leechers at once; returns each one's seconds until its file was whole.
fn leech_together(
    net: &Net,
    dir: &Path,
    tracker: &BtTracker,
    n: usize,
    limit: &str,
    name: &std::ffi::OsStr,
) -> Result<Vec<f64>, String> {
    // aria2c runs it with the GID, the file count and the first file's path.
    let hook = dir.join("done.sh");
    std::fs::write(&hook, "#!/bin/sh\ntouch \"$3.done\"\n").map_err(|e| e.to_string())?;
    make_executable(&hook)?;
    let hook = format!("--on-bt-download-complete={}", hook.display());
    let start = Instant::now();
    let mut leechers = Vec::new();
    for i in 0..n {
        let out = dir.join(format!("bt-leech{i}"));
        let mut cmd = net.hosts[2 + i].command("aria2c");
        cmd.args(aria2_bt_flags(free_port()))
            .args(["--seed-ratio=0.0", "--file-allocation=falloc", limit, &hook])
            .arg(format!("--dir={}", out.display()))
            .arg(&tracker.torrent);
        leechers.push((Proc::spawn(&format!("aria2c leecher {i}"), cmd), out));
    }
    let mut done: Vec<Option<f64>> = vec![None; n];
    let deadline = Duration::from_secs(600);
    while done.iter().any(Option::is_none) {
        if start.elapsed() > deadline {
            return Err(format!(
                "not all {n} aria2c leechers finished in {deadline:?}"
            ));
        }
        for (i, (_, out)) in leechers.iter().enumerate() {
            let marker = out.join(format!("{}.done", name.to_string_lossy()));
            if done[i].is_none() && marker.exists() {
                done[i] = Some(start.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (_, out) in &leechers {
        let _ = std::fs::remove_dir_all(out);
    }
    Ok(done.into_iter().flatten().collect())
}

fn make_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())
}

/// Bytes the aria2c seeder has uploaded, asked over its JSON-RPC interface.
fn uploaded(net: &Net, rpc: u16) -> Result<f64, String> {
    let body =
        r#"{"jsonrpc":"2.0","id":"b","method":"aria2.tellActive","params":[["uploadLength"]]}"#;
    let out = net.hosts[0]
        .command("curl")
        .args(["-s", "--max-time", "5", "-d", body])
        .arg(format!("http://127.0.0.1:{rpc}/jsonrpc"))
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("\"uploadLength\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("the aria2c seeder's RPC said {text:?}"))
}
