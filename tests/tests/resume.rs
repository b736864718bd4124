//! Crashes and restarts: processes killed with SIGKILL at awkward moments come back and carry
//! on, nothing verified is lost, nothing unverified is trusted.

use std::time::Duration;

use p2p_tests::{eventually, file_sha256, sample, write_random, Daemon, Swarm, Tracker};

const CHUNK: u64 = 64 << 10;
const MIB64: usize = 64 << 20;

#[test]
fn a_downloader_killed_early_midway_and_late_resumes_and_ends_bit_identical() {
    // One seeder at 24 MB/s: a 64 MiB download takes a few seconds, time to kill it thrice.
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "24000000"]);
    swarm.add_daemon(&[]);
    let file = swarm.path("big.bin");
    write_random(&file, MIB64, 20);
    swarm.daemons[0].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    let out = swarm.path("big-copy.bin");
    let part = swarm.path("big-copy.bin.part");
    let leecher = &mut swarm.daemons[1];
    leecher.ctl_json(&[
        "download",
        "big.bin",
        "-o",
        out.to_str().unwrap(),
        "--detach",
    ]);

    let total = MIB64 as u64 / CHUNK;
    let mut recovered_in_all = 0;
    for fraction in [0.15, 0.5, 0.9] {
        let before = leecher.wait_have((total as f64 * fraction) as u64);
        leecher.proc.kill();
        assert!(
            part.exists() && !out.exists(),
            "only the partial file exists"
        );
        // No new `download` command: it resumes by itself.
        leecher.restart();
        let st = leecher.download_status();
        let resumed = st["resumed_with"].as_u64().unwrap();
        assert!(
            resumed >= before,
            "chunks verified before the kill were lost: {resumed} < {before}"
        );
        assert!(
            leecher.proc.log().contains("did not stop cleanly"),
            "an unclean stop is noticed"
        );
        assert_ne!(st["state"]["state"], "failed", "{st}");
        // The scan ran: chunks written but not recorded were re-verified, not refetched.
        let scanned = leecher
            .proc
            .try_wait_for("re-verified chunks", Duration::from_secs(5))
            .expect("no recovery scan after an unclean stop");
        let recovered: u64 = scanned
            .split_whitespace()
            .find_map(|w| w.strip_prefix("recovered="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no recovered count in {scanned:?}"));
        recovered_in_all += recovered;
        eprintln!("killed at {before}/{total} chunks; resumed with {resumed}; {scanned}");
        leecher
            .proc
            .wait_for("connected to the tracker", Duration::from_secs(10));
    }
    // Each kill leaves the chunks of up to one commit interval (100 ms, about 2 MB here)
    // written but not recorded: some of them must have been taken in by re-verification.
    assert!(
        recovered_in_all > 0,
        "no chunk was recovered by re-verification over three kills"
    );
    leecher.wait_complete(Duration::from_secs(90));
    // Persisted across restarts: the total over all three kills.
    let refetched = leecher.download_status()["refetched"].as_u64().unwrap();
    eprintln!("refetched over three kills: {refetched} bytes");
    // At most the chunk being written at each kill is torn and fetched again.
    assert!(
        refetched <= 3 * CHUNK,
        "refetched {refetched} bytes over three kills"
    );
    assert!(!part.exists());
    assert_eq!(file_sha256(&out), file_sha256(&file));
}

#[test]
fn a_clean_restart_resumes_the_same_way() {
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "16000000"]);
    swarm.add_daemon(&[]);
    let file = swarm.path("f.bin");
    write_random(&file, 16 << 20, 21);
    swarm.daemons[0].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    let out = swarm.path("f-copy.bin");
    let leecher = &mut swarm.daemons[1];
    leecher.ctl_json(&["download", "f.bin", "-o", out.to_str().unwrap(), "--detach"]);
    let before = leecher.wait_have(64);
    leecher.ctl(&["quit"]).ok();
    assert!(leecher.proc.wait_exit(Duration::from_secs(10)).success());
    leecher.restart();
    assert!(!leecher.proc.log().contains("did not stop cleanly"));
    let st = leecher.download_status();
    assert!(st["resumed_with"].as_u64().unwrap() >= before, "{st}");
    assert_eq!(st["refetched"], 0);
    leecher.wait_complete(Duration::from_secs(90));
    assert_eq!(file_sha256(&out), file_sha256(&file));
    // The finished state itself survives a restart.
    leecher.ctl(&["quit"]).ok();
    leecher.proc.wait_exit(Duration::from_secs(10));
    leecher.restart();
    assert_eq!(leecher.download_status()["state"]["state"], "complete");
    assert_eq!(leecher.status()["shares"][0]["name"], "f.bin");
}

#[test]
fn the_tracker_killed_mid_download_comes_back_and_the_download_finishes() {
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "16000000"]);
    swarm.add_daemon(&[]);
    let file = swarm.path("t.bin");
    write_random(&file, 32 << 20, 22);
    swarm.daemons[0].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    let out = swarm.path("t-copy.bin");
    swarm.daemons[1].ctl_json(&["download", "t.bin", "-o", out.to_str().unwrap(), "--detach"]);
    swarm.daemons[1].wait_have(64);

    let addr = swarm.tracker.addr;
    let data = swarm.tracker.data_dir.clone();
    swarm.tracker.proc.kill();
    // Daemons notice and keep retrying; the download carries on from the peer it knows.
    let noticed = eventually(Duration::from_secs(10), || {
        (swarm.daemons[1].status()["tracker_connected"] == false).then_some(())
    });
    assert!(
        noticed.is_some(),
        "the daemon never noticed the tracker went away"
    );
    swarm.tracker = Tracker::start_on(&data, "30s", &addr.to_string(), &[]);
    for d in &swarm.daemons {
        let line = format!("{} has reconnected", d.addr);
        swarm.tracker.proc.wait_for(&line, Duration::from_secs(15));
    }
    swarm.daemons[1].wait_complete(Duration::from_secs(90));
    assert_eq!(file_sha256(&out), file_sha256(&file));
    let list = swarm.daemons[1].ctl(&["list"]).ok();
    assert!(list.contains("Name: t.bin"), "{list}");
    let doc = swarm.daemons[1].ctl_json(&["locate", "t.bin"]);
    assert_eq!(doc["holders"].as_array().unwrap().len(), 2, "{doc}");
}

#[test]
fn the_tracker_registry_survives_sigkill_and_absent_peers_expire_after_the_ttl() {
    let mut swarm = Swarm::new(2, "2s", &[]);
    swarm.daemons[0].register(&sample("doug.png"));
    swarm.daemons[1].register(&sample("sample.txt"));
    // Kill everything at once: nothing says goodbye.
    for d in &mut swarm.daemons {
        d.proc.kill();
    }
    let addr = swarm.tracker.addr;
    let data = swarm.tracker.data_dir.clone();
    swarm.tracker.proc.kill();
    swarm.tracker = Tracker::start_on(&data, "2s", &addr.to_string(), &[]);
    swarm
        .tracker
        .proc
        .wait_for("registry loaded files=2 peers=2", Duration::from_secs(5));
    let fresh = Daemon::start(&swarm.path("fresh"), addr, &[]);
    let list = fresh.ctl(&["list"]).ok();
    assert!(list.starts_with("There are currently 2 files"), "{list}");
    // The old peers never come back: dropped after the TTL, with their files.
    for d in &swarm.daemons {
        let line = format!("{} has disconnected", d.addr);
        swarm.tracker.proc.wait_for(&line, Duration::from_secs(6));
    }
    let list = fresh.ctl(&["list"]).ok();
    assert!(list.starts_with("There are currently 0 files"), "{list}");
}

#[test]
fn a_restarted_seeder_serves_without_rehashing() {
    let mut swarm = Swarm::new(2, "30s", &[]);
    let file = swarm.path("s.bin");
    write_random(&file, 3 << 20, 23);
    swarm.daemons[0].register(&file);
    swarm.daemons[0].ctl(&["quit"]).ok();
    swarm.daemons[0].proc.wait_exit(Duration::from_secs(10));
    swarm.daemons[0].restart();
    swarm.daemons[0]
        .proc
        .wait_for("share restored without re-hashing", Duration::from_secs(5));
    swarm.daemons[0]
        .proc
        .wait_for("connected to the tracker", Duration::from_secs(10));
    let out = swarm.path("s-copy.bin");
    swarm.daemons[1]
        .ctl(&["download", "s.bin", "-o", out.to_str().unwrap()])
        .ok();
    assert_eq!(file_sha256(&out), file_sha256(&file));
}

/// Rewrites `path` with other bytes of the same length and a later modification time.
fn tamper(path: &std::path::Path) {
    let mut data = std::fs::read(path).unwrap();
    for b in data.iter_mut().take(4096) {
        *b = !*b;
    }
    std::fs::write(path, &data).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
}

#[test]
fn a_changed_source_is_never_served_stale() {
    let mut swarm = Swarm::new(2, "30s", &[]);
    let file = swarm.path("c.bin");
    write_random(&file, 1 << 20, 24);
    let id = swarm.daemons[0].register(&file);

    // Changed while the daemon runs: the next request notices, and it stops serving it.
    tamper(&file);
    let out = swarm.path("c-copy.bin");
    swarm.daemons[1].ctl_json(&["download", &id, "-o", out.to_str().unwrap(), "--detach"]);
    let problem = eventually(Duration::from_secs(10), || {
        swarm.daemons[0].status()["shares"][0]["problem"]
            .as_str()
            .map(str::to_string)
    })
    .expect("the change was never noticed");
    assert!(
        problem.contains("changed since it was registered"),
        "{problem}"
    );
    let gone = eventually(Duration::from_secs(10), || {
        let list = swarm.daemons[1].ctl(&["list"]).ok();
        list.contains("There are currently 0 files").then_some(())
    });
    assert!(gone.is_some(), "the tracker still lists the stale file");
    assert!(!out.exists(), "nothing stale was assembled");
    assert_eq!(
        swarm.daemons[1].download_status()["state"]["state"],
        "running"
    );

    // Changed while the daemon is down: noticed at start, not announced.
    let file2 = swarm.path("d.bin");
    write_random(&file2, 100_000, 25);
    swarm.daemons[0].register(&file2);
    swarm.daemons[0].ctl(&["quit"]).ok();
    swarm.daemons[0].proc.wait_exit(Duration::from_secs(10));
    tamper(&file2);
    swarm.daemons[0].restart();
    swarm.daemons[0]
        .proc
        .wait_for("changed since it was registered", Duration::from_secs(5));
    let doc = swarm.daemons[0].status();
    let shares = doc["shares"].as_array().unwrap();
    assert!(shares.iter().all(|s| !s["problem"].is_null()), "{doc}");
}

#[test]
fn sigterm_stops_cleanly_and_a_stale_socket_does_not_block_the_next_start() {
    let mut swarm = Swarm::new(2, "30s", &[]);
    swarm.daemons[0].register(&sample("doug.png"));
    let addr = swarm.daemons[0].addr;
    swarm.daemons[0].proc.signal(libc::SIGTERM);
    let status = swarm.daemons[0].proc.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(!swarm.daemons[0].socket.exists(), "socket removed");
    swarm.tracker.proc.wait_for(
        &format!("{addr} has disconnected. 1 peers"),
        Duration::from_secs(5),
    );

    // SIGKILL leaves the socket file behind; the next start removes it and carries on.
    swarm.daemons[1].proc.kill();
    assert!(
        swarm.daemons[1].socket.exists(),
        "a crash leaves the socket"
    );
    swarm.daemons[1].restart();
    swarm.daemons[1]
        .proc
        .wait_for("removing a stale socket", Duration::from_secs(5));
    assert!(swarm.daemons[1].ctl(&["status"]).ok().contains("Sharing"));
}

#[test]
fn paused_running_complete_and_failed_states_survive_restarts() {
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "8000000"]);
    swarm.add_daemon(&[]);
    let (a, b) = (swarm.path("a.bin"), swarm.path("b.bin"));
    write_random(&a, 8 << 20, 30);
    write_random(&b, 8 << 20, 31);
    for f in [&a, &b] {
        swarm.daemons[0].ctl_json(&["register", f.to_str().unwrap(), "--chunk-size", "65536"]);
    }
    let (out_a, out_b) = (swarm.path("a-copy.bin"), swarm.path("b-copy.bin"));
    let leecher = &mut swarm.daemons[1];
    leecher.ctl_json(&[
        "download",
        "a.bin",
        "-o",
        out_a.to_str().unwrap(),
        "--detach",
    ]);
    leecher.wait_have(8);
    let out = leecher.ctl(&["pause", "a.bin"]).ok();
    assert!(out.starts_with("Paused a.bin"), "{out}");

    // b fails: its output appears while it downloads.
    leecher.ctl_json(&[
        "download",
        "b.bin",
        "-o",
        out_b.to_str().unwrap(),
        "--detach",
    ]);
    std::fs::write(&out_b, b"someone else's file").unwrap();
    let failed = eventually(Duration::from_secs(30), || {
        let s = leecher.status();
        let d = s["downloads"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == "b.bin")?
            .clone();
        (d["state"]["state"] == "failed").then_some(d)
    })
    .expect("b.bin never failed");
    assert!(
        failed["state"]["reason"]
            .as_str()
            .unwrap()
            .contains("appeared while downloading"),
        "{failed}"
    );

    leecher.ctl(&["quit"]).ok();
    leecher.proc.wait_exit(Duration::from_secs(10));
    leecher.restart();
    let s = leecher.status();
    let state_of = |name: &str| {
        s["downloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state_of("a.bin")["state"], "paused", "{s}");
    assert_eq!(state_of("b.bin")["state"], "failed", "{s}");
    assert!(state_of("b.bin")["reason"]
        .as_str()
        .unwrap()
        .contains("appeared"));

    leecher
        .proc
        .wait_for("connected to the tracker", Duration::from_secs(10));
    leecher.ctl(&["resume", "a.bin"]).ok();
    leecher.wait_complete(Duration::from_secs(90));
    assert_eq!(file_sha256(&out_a), file_sha256(&a));
    // Resuming after a failure works once the obstacle is gone.
    std::fs::remove_file(&out_b).unwrap();
    leecher.ctl(&["resume", "b.bin"]).ok();
    let done = eventually(Duration::from_secs(60), || {
        let s = leecher.status();
        s["downloads"]
            .as_array()?
            .iter()
            .all(|d| d["state"]["state"] == "complete")
            .then_some(())
    });
    assert!(done.is_some(), "{}", leecher.status());
    assert_eq!(file_sha256(&out_b), file_sha256(&b));
}

#[test]
fn cancel_removes_the_partial_file_and_unregister_stops_sharing() {
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "4000000"]);
    swarm.add_daemon(&[]);
    let f = swarm.path("c.bin");
    write_random(&f, 8 << 20, 32);
    swarm.daemons[0].ctl_json(&["register", f.to_str().unwrap(), "--chunk-size", "65536"]);
    let out = swarm.path("c-copy.bin");
    let part = swarm.path("c-copy.bin.part");
    let leecher = &swarm.daemons[1];
    leecher.ctl_json(&["download", "c.bin", "-o", out.to_str().unwrap(), "--detach"]);
    leecher.wait_have(4);
    let msg = leecher.ctl(&["cancel", "c.bin"]).ok();
    assert!(msg.starts_with("Cancelled c.bin"), "{msg}");
    assert!(!part.exists() && !out.exists());
    assert!(leecher.status()["downloads"].as_array().unwrap().is_empty());
    let holders = eventually(Duration::from_secs(5), || {
        let doc = leecher.ctl_json(&["locate", "c.bin"]);
        let h = doc["holders"].as_array().unwrap().clone();
        (h.len() == 1).then_some(h)
    })
    .expect("the tracker still lists the cancelled download");
    assert_eq!(holders[0]["addr"], swarm.daemons[0].addr.to_string());

    let msg = swarm.daemons[0].ctl(&["unregister", "c.bin"]).ok();
    assert!(msg.starts_with("No longer sharing c.bin"), "{msg}");
    assert!(f.exists(), "the file itself is untouched");
    let err = leecher.ctl(&["locate", "c.bin"]).fails();
    assert!(err.contains("no file named"), "{err}");
    let err = leecher.ctl(&["pause", "nothing"]).fails();
    assert!(err.contains("no file or download"), "{err}");
}

#[test]
fn a_daemon_started_before_its_tracker_keeps_trying_and_announces_once_it_is_up() {
    let dir = tempfile::tempdir().unwrap();
    // A free loopback port, nobody listening on it yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let d = Daemon::start_unconnected(&dir.path().join("peer"), addr, &[]);
    d.proc
        .wait_for("cannot reach the tracker", Duration::from_secs(5));
    let err = d
        .ctl(&["register", sample("doug.png").to_str().unwrap()])
        .fails();
    assert!(err.contains("not yet announced"), "{err}");
    assert_eq!(d.status()["tracker_connected"], false);

    let _tracker = Tracker::start_on(&dir.path().join("tracker"), "30s", &addr.to_string(), &[]);
    d.proc
        .wait_for("connected to the tracker", Duration::from_secs(15));
    let list = d.ctl(&["list"]).ok();
    assert!(
        list.contains("Name: doug.png"),
        "shared while the tracker was down: {list}"
    );
}
