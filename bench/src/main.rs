//! The benchmark: real release binaries on loopback, timed from the leecher's `p2pctl
//! download` until the file is complete and verified, repeated, medians printed as a table.
//!
//! Run it with `bench/run` (builds release first). Flags: `--quick` (fewer, smaller runs),
//! `--reps N`, `--dir DIR` (where the test files go; default a temporary directory).
//! Comparisons with aria2c (BitTorrent over opentracker, HTTP from nginx) run where those
//! programs are installed, and are skipped with a message where they are not.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2p_schema::frame::encode_frame;
use p2p_schema::{PeerId, TrackerRequest, TrackerResponse, PROTOCOL_VERSION};
use p2p_tests::fake::{manifest_of, read_frame};
use p2p_tests::{write_random, Daemon, Tracker};

const MIB: u64 = 1 << 20;

struct Options {
    reps: usize,
    quick: bool,
    dir: Option<PathBuf>,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let quick = args.iter().any(|a| a == "--quick");
    Options {
        reps: value("--reps")
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 1 } else { 5 }),
        quick,
        dir: value("--dir").map(PathBuf::from),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Peak resident memory (VmHWM) of a live process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
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

struct Row {
    scenario: String,
    seconds: f64,
    bytes: u64,
    marginal: Option<f64>,
    overhead: Option<f64>,
    leecher_rss: f64,
    seeder_rss: f64,
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| scenario | median s | MB/s | marginal MB/s | fixed overhead s | leecher peak RSS MiB | seeder peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let opt = |v: Option<f64>, digits: usize| {
            v.map(|x| format!("{x:.digits$}"))
                .unwrap_or_else(|| "".into())
        };
        println!(
            "| {} | {:.2} | {:.0} | {} | {} | {:.0} | {:.0} |",
            r.scenario,
            r.seconds,
            r.bytes as f64 / r.seconds / 1e6,
            opt(r.marginal, 0),
            opt(r.overhead, 2),
            r.leecher_rss,
            r.seeder_rss
        );
    }
}

/// Times `reps` downloads of `file` (registered on `seeders`) by fresh leechers.
fn swarm_download(
    dir: &Path,
    tracker: &Tracker,
    seeders: &[Daemon],
    file: &Path,
    reps: usize,
) -> (f64, f64) {
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    let mut times = Vec::new();
    let mut rss: f64 = 0.0;
    for rep in 0..reps {
        let data = dir.join(format!("leech-{name}-{rep}"));
        let leecher = Daemon::start(&data, tracker.addr, &[]);
        let out = dir.join(format!("out-{name}-{rep}"));
        let start = Instant::now();
        let done = leecher.ctl(&["-q", "download", &name, "-o", out.to_str().unwrap()]);
        let t = start.elapsed().as_secs_f64();
        assert!(done.status.success(), "{done:?}");
        rss = rss.max(peak_rss_mib(leecher.proc.pid()));
        times.push(t);
        let _ = std::fs::remove_file(&out);
        drop(leecher);
        let _ = std::fs::remove_dir_all(&data);
        eprint!(".");
        let _ = std::io::stderr().flush();
    }
    let _ = seeders;
    (median(times), rss)
}

fn main() {
    let opts = options();
    let tmp = tempfile_dir(&opts);
    let dir = tmp.as_path();
    let sizes: Vec<u64> = if opts.quick {
        vec![64 * MIB, 256 * MIB]
    } else {
        vec![256 * MIB, 1024 * MIB]
    };
    eprintln!(
        "p2p benchmark: release binaries in {}, files in {}, {} reps",
        p2p_tests::bin_dir().display(),
        dir.display(),
        opts.reps
    );
    let mut rows = Vec::new();
    let tracker = Tracker::start(&dir.join("tracker"), "30s");
    let seeders: Vec<Daemon> = (0..3)
        .map(|i| Daemon::start(&dir.join(format!("seed{i}")), tracker.addr, &[]))
        .collect();

    // Register (hashing), then N seeders -> 1 leecher for each size.
    let mut three = Vec::new();
    for &size in &sizes {
        let file = dir.join(format!("file-{}m.bin", size / MIB));
        write_random(&file, size as usize, size);
        let start = Instant::now();
        seeders[0].ctl_json(&["register", file.to_str().unwrap()]);
        let hashing = start.elapsed().as_secs_f64();
        rows.push(Row {
            scenario: format!("register (hash) {} MiB", size / MIB),
            seconds: hashing,
            bytes: size,
            marginal: None,
            overhead: None,
            leecher_rss: f64::NAN,
            seeder_rss: peak_rss_mib(seeders[0].proc.pid()),
        });
        for s in &seeders[1..] {
            s.ctl_json(&["register", file.to_str().unwrap()]);
        }
        eprint!("3 seeders -> 1 leecher, {} MiB ", size / MIB);
        let (t, rss) = swarm_download(dir, &tracker, &seeders, &file, opts.reps);
        eprintln!(" {t:.2} s");
        three.push((size, t, rss));
    }
    let seeder_rss = seeders
        .iter()
        .map(|s| peak_rss_mib(s.proc.pid()))
        .fold(0.0, f64::max);
    let ((s1, t1, _), (s2, t2, _)) = (three[0], three[1]);
    let marginal = (s2 - s1) as f64 / (t2 - t1) / 1e6;
    let overhead = t1 - s1 as f64 / (marginal * 1e6);
    for (size, t, rss) in &three {
        rows.push(Row {
            scenario: format!("3 seeders -> 1 leecher, {} MiB", size / MIB),
            seconds: *t,
            bytes: *size,
            marginal: Some(marginal),
            overhead: Some(overhead),
            leecher_rss: *rss,
            seeder_rss,
        });
    }

    // One seeder -> one leecher, largest size: the other two leave that file.
    let big = dir.join(format!("file-{}m.bin", sizes[1] / MIB));
    for s in &seeders[1..] {
        s.ctl_json(&["unregister", big.file_name().unwrap().to_str().unwrap()]);
    }
    eprint!("1 seeder -> 1 leecher, {} MiB ", sizes[1] / MIB);
    let (t, rss) = swarm_download(dir, &tracker, &seeders[..1], &big, opts.reps);
    eprintln!(" {t:.2} s");
    rows.push(Row {
        scenario: format!("1 seeder -> 1 leecher, {} MiB", sizes[1] / MIB),
        seconds: t,
        bytes: sizes[1],
        marginal: None,
        overhead: None,
        leecher_rss: rss,
        seeder_rss: peak_rss_mib(seeders[0].proc.pid()),
    });
    drop(seeders);

    print_table(&rows);
    leechers_feed_each_other(dir, &tracker, if opts.quick { 16 * MIB } else { 64 * MIB });
    tracker_load(dir, if opts.quick { 2 } else { 5 });
    comparisons();
}

/// Every daemon's uplink limited to 100 Mbit/s (12.5 MB/s, with `--upload-rate`): one
/// leecher alone from one seeder, then 10 leechers started together. With the seeder's uplink
/// the only source, 10 would take 10 times as long; they finish sooner only by feeding each
/// other.
fn leechers_feed_each_other(dir: &Path, tracker: &Tracker, size: u64) {
    let rate = "12500000";
    let base = dir.join("uplinks");
    let seeder = Daemon::start(&base.join("seed"), tracker.addr, &["--upload-rate", rate]);
    let file = base.join("shared-uplinks.bin");
    std::fs::create_dir_all(&base).expect("bench directory");
    write_random(&file, size as usize, 99);
    seeder.ctl_json(&["register", file.to_str().unwrap()]);
    let fetch = |d: &Daemon, i: usize| {
        let out = base.join(format!("out{i}.bin"));
        let start = Instant::now();
        let r = d.ctl(&[
            "-q",
            "download",
            "shared-uplinks.bin",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "{r:?}");
        start.elapsed().as_secs_f64()
    };
    let alone = {
        let d = Daemon::start(&base.join("alone"), tracker.addr, &["--upload-rate", rate]);
        fetch(&d, 0)
    };
    let leechers: Vec<Daemon> = (1..=10)
        .map(|i| {
            Daemon::start(
                &base.join(format!("l{i}")),
                tracker.addr,
                &["--upload-rate", rate],
            )
        })
        .collect();
    let times: Vec<f64> = std::thread::scope(|s| {
        let jobs: Vec<_> = leechers
            .iter()
            .enumerate()
            .map(|(i, d)| s.spawn(move || fetch(d, i + 1)))
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("leecher"))
            .collect()
    });
    let slowest = times.iter().cloned().fold(0.0, f64::max);
    println!();
    println!(
        "uplinks limited to 100 Mbit/s each, {} MiB: one leecher alone {alone:.2} s; 10 leechers \
         together: slowest {slowest:.2} s ({:.2}x alone; without peers feeding each other it \
         would be about 10x)",
        size / MIB,
        slowest / alone
    );
}

fn tempfile_dir(opts: &Options) -> PathBuf {
    let base = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("p2p-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench directory");
    dir
}

fn send<T: serde::Serialize>(s: &mut std::net::TcpStream, msg: &T) {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf).expect("encode");
    s.write_all(&buf).expect("send");
}

/// The tracker under 200 concurrent sessions, announce/locate mix, for `secs` seconds.
fn tracker_load(dir: &Path, secs: u64) {
    let tracker = Tracker::start(&dir.join("tracker-load"), "60s");
    let addr = tracker.addr;
    let sessions = 200usize;
    let files = 50usize;
    let manifests: Vec<_> = (0..files)
        .map(|i| manifest_of(&format!("f{i}"), &vec![i as u8; 1 << 20], 1024))
        .collect();
    let before = peak_rss_mib(tracker.proc.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(std::sync::Barrier::new(sessions + 1));
    let handles: Vec<_> = (0..sessions)
        .map(|i| {
            let (stop, count, ready) = (stop.clone(), count.clone(), ready.clone());
            let manifests = manifests.clone();
            std::thread::spawn(move || load_session(addr, i, &manifests, &stop, &count, &ready))
        })
        .collect();
    ready.wait();
    let registered_rss = peak_rss_mib(tracker.proc.pid());
    let start = Instant::now();
    let begin = count.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(secs));
    let done = count.load(Ordering::SeqCst) - begin;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        let _ = h.join();
    }
    let pairs = (sessions * files) as f64;
    println!();
    println!(
        "tracker: {:.0} requests/s (announce/locate mix, {sessions} concurrent sessions pipelining 8, {secs} s); \
         {:.0} bytes of memory per registered peer-file pair ({} pairs, 1,024 chunks each)",
        done as f64 / elapsed,
        (registered_rss - before) * 1024.0 * 1024.0 / pairs,
        pairs
    );
}

fn load_session(
    addr: SocketAddr,
    i: usize,
    manifests: &[p2p_schema::Manifest],
    stop: &AtomicBool,
    count: &AtomicU64,
    ready: &std::sync::Barrier,
) {
    let mut s = std::net::TcpStream::connect(addr).expect("tracker");
    s.set_nodelay(true).ok();
    let listen: SocketAddr = format!("127.0.0.1:{}", 10000 + i).parse().unwrap();
    send(
        &mut s,
        &TrackerRequest::Hello {
            version: PROTOCOL_VERSION,
            peer_id: PeerId::random(),
            listen,
            agent: "bench".into(),
            secret: None,
        },
    );
    let _ = read_frame::<TrackerResponse>(&mut s);
    for m in manifests {
        send(
            &mut s,
            &TrackerRequest::Register {
                manifest: m.clone(),
            },
        );
        let _ = read_frame::<TrackerResponse>(&mut s);
    }
    ready.wait();
    let ids: Vec<_> = manifests.iter().map(|m| m.file_id()).collect();
    // Like a daemon's session, requests are pipelined (a window of 8), answered in order.
    let window = 8u64;
    let mut n = 0u64;
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        buf.clear();
        for k in 0..window {
            let file_id = ids[((n + k) as usize + i) % ids.len()];
            let request = if (n + k).is_multiple_of(2) {
                TrackerRequest::Gained {
                    file_id,
                    indices: vec![((n + k) % 1024) as u32],
                }
            } else {
                TrackerRequest::Locate { file_id, max: 50 }
            };
            encode_frame(&request, &mut buf).expect("encode");
        }
        if s.write_all(&buf).is_err() {
            return;
        }
        for _ in 0..window {
            if read_frame::<TrackerResponse>(&mut s)
                .ok()
                .flatten()
                .is_none()
            {
                return;
            }
        }
        count.fetch_add(window, Ordering::Relaxed);
        n += window;
    }
}

/// aria2c / nginx / opentracker, for the same file in the same run, where installed.
fn comparisons() {
    let have = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = ["aria2c", "nginx", "opentracker", "mktorrent"]
        .into_iter()
        .filter(|p| !have(p))
        .collect();
    println!();
    if missing.is_empty() {
        println!("comparisons: aria2c, nginx, opentracker and mktorrent are installed, but the comparison runner is not written yet; see docs/performance.md for figures measured by hand");
    } else {
        println!(
            "comparisons skipped: not installed: {} (apt-get install aria2 nginx opentracker mktorrent)",
            missing.join(", ")
        );
    }
    println!("namespace (rate-limited uplink) scenarios skipped: not written yet");
}
