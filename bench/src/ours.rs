//! Our system in each scenario: a real `p2p-tracker` on the hub, real `p2pd` daemons on the
//! hosts, timed from the leecher's `p2pctl download` until it returns (every chunk SHA-256
//! verified, synced, the file renamed into place).

use std::path::Path;
use std::time::Instant;

use p2p_tests::{Daemon, Tracker};

use crate::crowd::Crowd;
use crate::lab::Net;
use crate::measure::{peak_rss_mib, repeat};
use crate::Sample;

pub(crate) fn start_daemon(
    net: &Net,
    host: usize,
    data: &Path,
    tracker: &Tracker,
    extra: &[&str],
) -> Daemon {
    let h = &net.hosts[host];
    Daemon::start_in(
        &h.prefix(),
        &format!("{}:0", h.ip),
        data,
        tracker.addr,
        extra,
    )
}

pub(crate) fn start_tracker(net: &Net, dir: &Path) -> Tracker {
    Tracker::start_in(
        &net.hub.prefix(),
        &dir.join("tracker"),
        "30s",
        &format!("{}:0", net.hub.ip),
        &[],
    )
}

/// One download of `name` by `leecher` into `out`; seconds until `p2pctl download` returned.
fn fetch(leecher: &Daemon, name: &str, out: &Path) -> f64 {
    let start = Instant::now();
    let done = leecher.ctl(&["-q", "download", name, "-o", &out.to_string_lossy()]);
    let t = start.elapsed().as_secs_f64();
    assert!(done.status.success(), "download failed: {done:?}");
    t
}

/// One download of `name` by `leecher` into `out`, followed to its end by one `p2pctl
/// download` (not by polling `status`: a hundred leechers polling ten times a second spent
/// more of the two cores starting `p2pctl` than the daemons had); seconds until it returned,
/// `None` if it failed (the daemon killed, say) or took over 10 minutes.
fn fetch_watched(leecher: &Daemon, name: &str, out: &Path) -> Option<f64> {
    let start = Instant::now();
    let mut child = std::process::Command::new(p2p_tests::bin("p2pctl"))
        .arg("--socket")
        .arg(&leecher.socket)
        .args(["-q", "download", name, "-o"])
        .arg(out)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    while start.elapsed() < std::time::Duration::from_secs(600) {
        match child.try_wait() {
            Ok(Some(status)) => return status.success().then(|| start.elapsed().as_secs_f64()),
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// `seeders` daemons on the first hosts register `file` (the first one's registration is
/// timed), then a fresh leecher on the next host downloads it, `reps` times.
/// Returns the download sample and the seconds the first registration took.
pub fn download(
    net: &Net,
    seeders: usize,
    dir: &Path,
    file: &Path,
    reps: usize,
    extra: &[&str],
) -> (Sample, f64) {
    let tracker = start_tracker(net, dir);
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .expect("UTF-8 file name");
    let seeds: Vec<Daemon> = (0..seeders)
        .map(|i| start_daemon(net, i, &dir.join(format!("seed{i}")), &tracker, extra))
        .collect();
    let mut register_secs = 0.0;
    for (i, s) in seeds.iter().enumerate() {
        let start = Instant::now();
        s.ctl_json(&["register", &file.to_string_lossy()]);
        if i == 0 {
            register_secs = start.elapsed().as_secs_f64();
        }
    }
    let pids: Vec<u32> = seeds.iter().map(|s| s.proc.pid()).collect();
    let sample = repeat(reps, &pids, |rep| {
        let data = dir.join(format!("leech{rep}"));
        let leecher = start_daemon(net, seeders, &data, &tracker, extra);
        let out = dir.join(format!("out{rep}"));
        let t = fetch(&leecher, name, &out);
        let rss = peak_rss_mib(leecher.proc.pid());
        let _ = std::fs::remove_file(&out);
        drop(leecher);
        let _ = std::fs::remove_dir_all(&data);
        Ok((t, rss))
    });
    // A failed download panics in `fetch`; the closure itself never returns an error.
    (sample.expect("repetitions"), register_secs)
}

/// One seeder (host 0) and `file`: one leecher alone (host 1), then `n` leechers (hosts 2
/// to n + 1) started together. Every daemon gets `extra` (an `--upload-rate` where uplinks
/// are emulated on loopback). What the seeder sent is read from its metrics.
pub fn crowd(net: &Net, dir: &Path, file: &Path, n: usize, extra: &[&str]) -> Crowd {
    let (tracker, seeder, name, id) = seed(net, dir, file, extra);
    let name = name.as_str();
    let alone = {
        let d = start_daemon(net, 1, &dir.join("alone"), &tracker, extra);
        fetch(&d, name, &dir.join("out-alone"))
    };
    crate::tick();
    let leechers: Vec<Daemon> = (0..n)
        .map(|i| start_daemon(net, 2 + i, &dir.join(format!("l{i}")), &tracker, extra))
        .collect();
    let times: Vec<f64> = std::thread::scope(|s| {
        let jobs: Vec<_> = leechers
            .iter()
            .enumerate()
            .map(|(i, d)| {
                s.spawn(move || {
                    fetch_watched(d, name, &dir.join(format!("out{i}")))
                        .expect("a leecher of the crowd failed or never completed")
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("leecher thread"))
            .collect()
    });
    crate::tick();
    for i in 0..n {
        let _ = std::fs::remove_file(dir.join(format!("out{i}")));
    }
    Crowd {
        // The leecher that went alone took one copy.
        seeder_sent: copies_sent(&seeder, &id, file) - 1.0,
        alone,
        slowest: times.iter().cloned().fold(0.0, f64::max),
        fastest: times.iter().cloned().fold(f64::INFINITY, f64::min),
        seeder_rss: peak_rss_mib(seeder.proc.pid()),
    }
}

/// Scrapes `daemon`'s metrics from inside its host (it runs with `--metrics`).
fn metrics_of(daemon: &Daemon) -> p2p_tests::metrics::Scrape {
    let status = daemon.status();
    let addr = status["info"]["metrics"].as_str().unwrap_or_default();
    let prefix: Vec<&str> = daemon.prefix();
    let out = p2p_tests::prefixed(&prefix, std::path::Path::new("curl"))
        .args(["-s", "--max-time", "10"])
        .arg(format!("http://{addr}/metrics"))
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    p2p_tests::metrics::parse(&text).unwrap_or_default()
}

/// What a crowd that lost some of its leechers measured.
pub struct Losses {
    /// The slowest leecher that was not killed.
    pub slowest: f64,
    pub finished: usize,
    pub killed: usize,
    /// Leechers not killed whose download did not complete.
    pub failed: usize,
    /// Finished leechers whose file is not the seeder's, byte for byte.
    pub corrupt: usize,
    pub seeder_sent: f64,
}

/// Like [`crowd`], without the leecher alone, but `lose` of the `n` leechers are killed
/// (SIGKILL), each at its own random moment between 10 % and 70 % of `alone` seconds after
/// the crowd started. Every file a surviving leecher completed is compared with the seeder's.
pub fn crowd_with_losses(
    net: &Net,
    dir: &Path,
    file: &Path,
    n: usize,
    lose: usize,
    alone: f64,
) -> Losses {
    let (tracker, seeder, name, id) = seed(net, dir, file, &[]);
    let name = name.as_str();
    let leechers: Vec<Daemon> = (0..n)
        .map(|i| start_daemon(net, 1 + i, &dir.join(format!("l{i}")), &tracker, &[]))
        .collect();
    let mut rng = fastrand::Rng::with_seed(42);
    let mut victims: Vec<(f64, usize)> = rng
        .choose_multiple(0..n, lose)
        .into_iter()
        .map(|i| (alone * (0.1 + 0.6 * rng.f64()), i))
        .collect();
    victims.sort_by(|a, b| a.0.total_cmp(&b.0));
    let killed: Vec<usize> = victims.iter().map(|(_, i)| *i).collect();
    let start = Instant::now();
    let times: Vec<Option<f64>> = std::thread::scope(|s| {
        let jobs: Vec<_> = leechers
            .iter()
            .enumerate()
            .map(|(i, d)| {
                s.spawn(move || {
                    fetch_watched(d, name, &dir.join(format!("out{i}")))
                        .map(|_| start.elapsed().as_secs_f64())
                })
            })
            .collect();
        for (at, i) in &victims {
            let wait = at - start.elapsed().as_secs_f64();
            if wait > 0.0 {
                std::thread::sleep(std::time::Duration::from_secs_f64(wait));
            }
            leechers[*i].proc.signal(libc::SIGKILL);
        }
        jobs.into_iter().map(|j| j.join().unwrap_or(None)).collect()
    });
    crate::tick();
    let want = p2p_tests::file_sha256(file);
    let mut survivors = Vec::new();
    let (mut corrupt, mut failed) = (0, 0);
    for (i, t) in times.iter().enumerate() {
        let out = dir.join(format!("out{i}"));
        if killed.contains(&i) {
            let _ = std::fs::remove_file(&out);
            continue;
        }
        match t {
            None => failed += 1,
            Some(t) if out.exists() && p2p_tests::file_sha256(&out) == want => survivors.push(*t),
            Some(_) => corrupt += 1,
        }
        let _ = std::fs::remove_file(&out);
    }
    Losses {
        slowest: survivors.iter().cloned().fold(0.0, f64::max),
        finished: survivors.len(),
        killed: killed.len(),
        failed,
        corrupt,
        seeder_sent: copies_sent(&seeder, &id, file),
    }
}

/// A crowd's tracker on the hub and its seeder on host 0 (with `extra`, and its metrics
/// served), `file` registered: the tracker, the seeder, the file's name and ID.
fn seed(net: &Net, dir: &Path, file: &Path, extra: &[&str]) -> (Tracker, Daemon, String, String) {
    let tracker = start_tracker(net, dir);
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .expect("UTF-8 file name")
        .to_string();
    let metrics = format!("{}:0", net.hosts[0].ip);
    let flags: Vec<&str> = extra
        .iter()
        .copied()
        .chain(["--metrics", &metrics])
        .collect();
    let seeder = start_daemon(net, 0, &dir.join("seed"), &tracker, &flags);
    let id = seeder.ctl_json(&["register", &file.to_string_lossy()])["file"]["id"]
        .as_str()
        .expect("file id")
        .to_string();
    (tracker, seeder, name, id)
}

/// Copies of `file` (ID `id`) the seeder has sent, from its metrics.
fn copies_sent(seeder: &Daemon, id: &str, file: &Path) -> f64 {
    let sent = metrics_of(seeder)
        .get(&format!("p2pd_sent_bytes_total{{file=\"{id}\"}}"))
        .unwrap_or(f64::NAN);
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(1) as f64;
    sent / size
}
