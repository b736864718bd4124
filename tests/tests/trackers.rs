//! Several trackers: each file's record on two of three, one killed in the middle of a
//! crowd, then replaced by an empty one at the same address (real processes on loopback).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use p2p_tests::{bin, eventually, file_sha256, write_random, Daemon, Tracker};

/// The tracker's `stats --json` document, or `None` if it cannot be asked.
fn stats(addr: SocketAddr) -> Option<serde_json::Value> {
    let out = Command::new(bin("p2p-tracker"))
        .args(["stats", "--json", "--tracker", &addr.to_string()])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn files_on(addr: SocketAddr) -> u64 {
    stats(addr).and_then(|s| s["files"].as_u64()).unwrap_or(0)
}

#[test]
fn a_tracker_killed_mid_crowd_stalls_nothing_and_an_empty_replacement_is_refilled() {
    let dir = tempfile::tempdir().unwrap();
    let mut trackers: Vec<Tracker> = (0..3)
        .map(|i| Tracker::start(&dir.path().join(format!("tracker{i}")), "30s"))
        .collect();
    let addrs: Vec<SocketAddr> = trackers.iter().map(|t| t.addr).collect();
    let start = |name: &str, extra: &[&str]| {
        Daemon::start_with_trackers(&dir.path().join(name), &addrs, extra)
    };
    // The seeder's uplink makes the crowd last: 24 MiB at 3 MB/s is 8 s for one copy.
    let seeder = start("seeder", &["--upload-rate", "3000000"]);
    let big = dir.path().join("big.bin");
    write_random(&big, 24 << 20, 3000);
    let big_id = seeder.register(&big);
    // Its record is on exactly two of the three trackers.
    let homes: Vec<usize> = (0..3).filter(|&i| files_on(addrs[i]) == 1).collect();
    assert_eq!(homes.len(), 2, "the file is on trackers {homes:?}");
    let victim = homes[0];
    let mut small = Vec::new();
    for i in 0..4 {
        let path = dir.path().join(format!("small{i}.txt"));
        write_random(&path, 100_000 + i, 3100 + i as u64);
        seeder.register(&path);
        small.push(path);
    }

    let leechers: Vec<Daemon> = (0..5).map(|i| start(&format!("l{i}"), &[])).collect();
    for (i, l) in leechers.iter().enumerate() {
        let out = dir.path().join(format!("out{i}.bin"));
        l.ctl(&["download", &big_id, "-o", out.to_str().unwrap(), "--detach"])
            .ok();
    }
    // Watch every leecher's progress; kill one of the big file's trackers after 2 s.
    let began = Instant::now();
    let mut last: Vec<(u64, Instant)> = vec![(0, Instant::now()); leechers.len()];
    let mut longest = Duration::ZERO;
    let mut killed_at = None;
    let mut done = vec![false; leechers.len()];
    while done.iter().any(|d| !d) {
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "the crowd never finished"
        );
        if killed_at.is_none() && began.elapsed() > Duration::from_secs(2) {
            trackers[victim].proc.kill();
            killed_at = Some(Instant::now());
        }
        for (i, l) in leechers.iter().enumerate() {
            if done[i] {
                continue;
            }
            let st = l.download_status();
            let have = st["have"].as_u64().unwrap_or(0);
            if have > last[i].0 {
                longest = longest.max(last[i].1.elapsed());
                last[i] = (have, Instant::now());
            }
            done[i] = st["state"]["state"] == "complete";
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let killed_at = killed_at.expect("the crowd ended before a tracker was killed");
    assert!(
        killed_at.elapsed() > Duration::from_secs(1),
        "the crowd ended too soon after the kill to show anything"
    );
    eprintln!("longest time without progress: {longest:?}");
    assert!(
        longest <= Duration::from_secs(2),
        "a download made no progress for {longest:?}"
    );
    let want = file_sha256(&big);
    for i in 0..leechers.len() {
        assert_eq!(file_sha256(&dir.path().join(format!("out{i}.bin"))), want);
    }

    // With one tracker down, `list` shows every file and a download by name works for each.
    let listed = leechers[0].ctl_json(&["list"]);
    let names: Vec<&str> = listed["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names.len(), 5, "{listed}");
    for path in &small {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(names.contains(&name), "{name} not listed: {names:?}");
        let out = dir.path().join(format!("got-{name}"));
        leechers[1]
            .ctl(&["download", name, "-o", out.to_str().unwrap()])
            .ok();
        assert_eq!(file_sha256(&out), file_sha256(path));
    }

    // An empty tracker at the dead one's address is refilled by the daemons' re-announcements.
    trackers[victim] = Tracker::start_on(
        &dir.path().join("tracker-replacement"),
        "30s",
        &addrs[victim].to_string(),
        &[],
    );
    let refilled = eventually(Duration::from_secs(60), || {
        let s = stats(addrs[victim])?;
        let files = s["files"].as_u64()?;
        let holdings = s["holdings"].as_u64()?;
        // The big file, held whole by the seeder and the five leechers.
        (files >= 1 && holdings >= 6).then_some(s)
    });
    assert!(
        refilled.is_some(),
        "the replacement tracker was never refilled: {:?}",
        stats(addrs[victim])
    );
}
