//! The tools people would otherwise use, run on the same file in the same way: aria2c over
//! BitTorrent (torrent made by mktorrent, opentracker as the tracker, DHT, local peer
//! discovery and peer exchange off), aria2c over HTTP from nginx mirrors with the whole file
//! SHA-256 checked, and curl from one nginx with nothing checked.

use std::path::{Path, PathBuf};
use std::time::Duration;

use p2p_tests::Proc;

use crate::lab::{Host, Net};
use crate::measure::{free_port, installed, poll, repeat, run_timed};
use crate::Sample;

/// Longest any one external download may take before aria2c/curl give up.
const LIMIT_SECS: &str = "600";
const LIMIT: Duration = Duration::from_secs(610);

/// Which of the tools are missing (empty: all can run).
pub fn missing() -> Vec<&'static str> {
    ["aria2c", "nginx", "opentracker", "mktorrent", "curl"]
        .into_iter()
        .filter(|p| !installed(p))
        .collect()
}

/// aria2c flags common to every BitTorrent peer: everything local, nothing discovered.
pub(crate) fn aria2_bt_flags(port: u16) -> Vec<String> {
    [
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=false",
        "--disable-ipv6=true",
        "--bt-max-peers=0",
        "--summary-interval=0",
        "--console-log-level=warn",
        "--check-certificate=false",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        format!("--listen-port={port}"),
        format!("--stop={LIMIT_SECS}"),
    ])
    .collect()
}

/// A running opentracker on the hub, and a torrent of `file` announcing to it.
pub(crate) struct BtTracker {
    _proc: Proc,
    pub(crate) torrent: PathBuf,
    url: String,
    info_hash: String,
}

impl BtTracker {
    /// Pieces of 2^`piece_log` bytes.
    pub(crate) fn start(
        hub: &Host,
        dir: &Path,
        file: &Path,
        piece_log: u32,
    ) -> Result<BtTracker, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let port = free_port();
        let url = format!("http://{}:{port}", hub.ip);
        let torrent = dir.join("file.torrent");
        let _ = std::fs::remove_file(&torrent);
        let out = std::process::Command::new("mktorrent")
            .args(["-l", &piece_log.to_string()])
            .args(["-a", &format!("{url}/announce"), "-o"])
            .arg(&torrent)
            .arg(file)
            .output()
            .map_err(|e| format!("mktorrent: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mktorrent: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let shown = std::process::Command::new("aria2c")
            .arg("-S")
            .arg(&torrent)
            .output()
            .map_err(|e| format!("aria2c -S: {e}"))?;
        let info_hash = String::from_utf8_lossy(&shown.stdout)
            .lines()
            .find_map(|l| {
                l.strip_prefix("Info Hash: ")
                    .map(str::trim)
                    .map(String::from)
            })
            .ok_or("aria2c -S printed no info hash")?;
        // Debian's opentracker serves only whitelisted torrents. Run as root it chroots to
        // `-d` before reading the list: `/` keeps the absolute path valid.
        let whitelist = dir.join("whitelist");
        std::fs::write(&whitelist, format!("{info_hash}\n")).map_err(|e| e.to_string())?;
        let mut cmd = hub.command("opentracker");
        cmd.args(["-i", &hub.ip.to_string(), "-p", &port.to_string()])
            .args(["-P", &port.to_string(), "-d", "/", "-w"])
            .arg(&whitelist);
        let proc = Proc::spawn("opentracker", cmd);
        if !poll(Duration::from_secs(10), || {
            curl_ok(hub, &format!("{url}/stats"))
        }) {
            return Err(format!("opentracker never answered: {}", proc.log()));
        }
        Ok(BtTracker {
            _proc: proc,
            torrent,
            url,
            info_hash,
        })
    }

    /// How many complete peers (seeders) the tracker lists for the torrent.
    pub(crate) fn seeders(&self, hub: &Host) -> usize {
        let escaped: String = self
            .info_hash
            .as_bytes()
            .chunks(2)
            .map(|pair| format!("%{}", String::from_utf8_lossy(pair)))
            .collect();
        let out = hub
            .command("curl")
            .args(["-s", "--max-time", "5"])
            .arg(format!("{}/scrape?info_hash={escaped}", self.url))
            .output();
        let Ok(out) = out else { return 0 };
        let body = String::from_utf8_lossy(&out.stdout);
        body.split("8:completei")
            .nth(1)
            .and_then(|rest| rest.split('e').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

pub(crate) fn curl_ok(host: &Host, url: &str) -> bool {
    host.command("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "2", url])
        .status()
        .is_ok_and(|s| s.success())
}

/// aria2c BitTorrent: `seeders` aria2c seeders on the first hosts, a fresh aria2c leecher on
/// the next host for each repetition, from start until it exits (every piece SHA-1 checked).
pub fn bittorrent(
    net: &Net,
    seeders: usize,
    dir: &Path,
    file: &Path,
    reps: usize,
) -> Result<Sample, String> {
    // Pieces of 1 MiB (2^20), the size a BitTorrent user would pick for a GiB.
    let tracker = BtTracker::start(&net.hub, &dir.join("opentracker"), file, 20)?;
    let name = file.file_name().ok_or("file has no name")?;
    let mut procs = Vec::new();
    for (i, host) in net.hosts[..seeders].iter().enumerate() {
        // Each seeder its own directory holding a hard link to the file: same page cache.
        let seed_dir = dir.join(format!("bt-seed{i}"));
        std::fs::create_dir_all(&seed_dir).map_err(|e| e.to_string())?;
        link_into(file, &seed_dir.join(name))?;
        let mut cmd = host.command("aria2c");
        cmd.args(aria2_bt_flags(free_port()))
            .args(["--seed-ratio=0.0", "--bt-seed-unverified=true"])
            .arg(format!("--dir={}", seed_dir.display()))
            .arg(&tracker.torrent);
        procs.push(Proc::spawn(&format!("aria2c seeder {i}"), cmd));
    }
    if !poll(Duration::from_secs(20), || {
        tracker.seeders(&net.hub) >= seeders
    }) {
        return Err(format!(
            "the aria2c seeders never all announced ({} of {seeders})",
            tracker.seeders(&net.hub)
        ));
    }
    let leecher = &net.hosts[seeders];
    let pids: Vec<u32> = procs.iter().map(Proc::pid).collect();
    repeat(reps, &pids, |rep| {
        let out_dir = dir.join(format!("bt-leech{rep}"));
        let _ = std::fs::remove_dir_all(&out_dir);
        let mut cmd = leecher.command("aria2c");
        cmd.args(aria2_bt_flags(free_port()))
            .args(["--seed-time=0", "--file-allocation=falloc"])
            .arg(format!("--dir={}", out_dir.display()))
            .arg(&tracker.torrent);
        let timed = run_timed(cmd, &dir.join("aria2c-bt.log"), LIMIT)?;
        check_size(&out_dir.join(name), file)?;
        let _ = std::fs::remove_dir_all(&out_dir);
        Ok(timed)
    })
}

/// A running nginx serving `root`.
fn nginx(host: &Host, dir: &Path, root: &Path, index: usize) -> Result<(Proc, String), String> {
    let prefix = dir.join(format!("nginx{index}"));
    std::fs::create_dir_all(prefix.join("tmp")).map_err(|e| e.to_string())?;
    let port = free_port();
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;"
    } else {
        ""
    };
    let p = prefix.display();
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; {user}
pid {p}/nginx.pid; error_log {p}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off; sendfile on; tcp_nopush on; default_type application/octet-stream;
  client_body_temp_path {p}/tmp/body; proxy_temp_path {p}/tmp/proxy;
  fastcgi_temp_path {p}/tmp/fastcgi; uwsgi_temp_path {p}/tmp/uwsgi; scgi_temp_path {p}/tmp/scgi;
  server {{ listen {ip}:{port}; root {root}; }}
}}
",
        ip = host.ip,
        root = root.display()
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let mut cmd = host.command("nginx");
    cmd.arg("-p")
        .arg(&prefix)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-c")
        .arg(&conf_path);
    let proc = Proc::spawn(&format!("nginx {index}"), cmd);
    let url = format!("http://{}:{port}", host.ip);
    // Without -f, curl succeeds on any HTTP answer (here a 403 for the directory).
    if !poll(Duration::from_secs(10), || {
        curl_ok(host, &format!("{url}/"))
    }) {
        let log = std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default();
        return Err(format!("nginx never answered: {}", log.trim()));
    }
    Ok((proc, url))
}

/// aria2c over HTTP from `mirrors` nginx servers (on the first hosts), the whole file's
/// SHA-256 checked by aria2c; or, with `verify` false and one mirror, curl with nothing
/// checked.
pub fn http(
    net: &Net,
    mirrors: usize,
    verify: bool,
    dir: &Path,
    file: &Path,
    reps: usize,
) -> Result<Sample, String> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("file has no name")?;
    let root = file.parent().ok_or("file has no directory")?;
    let mut servers = Vec::new();
    let mut urls = Vec::new();
    for (i, host) in net.hosts[..mirrors].iter().enumerate() {
        let (proc, url) = nginx(host, dir, root, i)?;
        servers.push(proc);
        urls.push(format!("{url}/{name}"));
    }
    let sha256 = if verify {
        p2p_tests::file_sha256(file)
    } else {
        String::new()
    };
    let leecher = &net.hosts[mirrors];
    let pids: Vec<u32> = servers.iter().map(Proc::pid).collect();
    repeat(reps, &pids, |rep| {
        let out_dir = dir.join(format!("http-out{rep}"));
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
        let out = out_dir.join(name);
        let cmd = if verify {
            let mut cmd = leecher.command("aria2c");
            cmd.args([
                "--split=12",
                "--max-connection-per-server=4",
                "--min-split-size=16M",
                "--file-allocation=falloc",
                "--summary-interval=0",
                "--console-log-level=warn",
                "--allow-overwrite=true",
            ])
            .arg(format!("--checksum=sha-256={sha256}"))
            .arg(format!("--stop={LIMIT_SECS}"))
            .arg(format!("--dir={}", out_dir.display()))
            .arg(format!("--out={name}"))
            .args(&urls);
            cmd
        } else {
            let mut cmd = leecher.command("curl");
            cmd.args(["-sS", "-f", "--max-time", LIMIT_SECS, "-o"])
                .arg(&out)
                .arg(&urls[0]);
            cmd
        };
        let timed = run_timed(cmd, &dir.join("http.log"), LIMIT)?;
        check_size(&out, file)?;
        let _ = std::fs::remove_dir_all(&out_dir);
        Ok(timed)
    })
}

/// `openssl dgst -sha256` of the file (in the page cache): the cost of verifying alone.
pub fn sha256_alone(dir: &Path, file: &Path, reps: usize) -> Result<Sample, String> {
    repeat(reps, &[], |_| {
        let mut cmd = std::process::Command::new("openssl");
        cmd.args(["dgst", "-sha256"]).arg(file);
        run_timed(cmd, &dir.join("openssl.log"), LIMIT)
    })
}

/// Hard links `from` (a file, or every file of a tree) at `to`: same page cache, no copy.
pub(crate) fn link_into(from: &Path, to: &Path) -> Result<(), String> {
    if from.is_dir() {
        let _ = std::fs::remove_dir_all(to);
        let out = std::process::Command::new("cp")
            .arg("-al")
            .arg(from)
            .arg(to)
            .output()
            .map_err(|e| format!("cp -al: {e}"))?;
        return if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "cp -al: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        };
    }
    let _ = std::fs::remove_file(to);
    std::fs::hard_link(from, to).map_err(|e| format!("hard link: {e}"))
}

/// Bytes in a file, or in every file of a tree.
pub(crate) fn size_of(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| size_of(&e.path())).sum())
        .unwrap_or(0)
}

fn check_size(got: &Path, want: &Path) -> Result<(), String> {
    let g = size_of(got);
    let w = size_of(want).max(1);
    if g == w {
        Ok(())
    } else {
        Err(format!("{} has {g} bytes, expected {w}", got.display()))
    }
}
