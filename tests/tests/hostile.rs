//! Broken and hostile peers: crashing seeders, lying peers, silent and dripping peers, many
//! downloaders at once. The download always ends bit-identical, or waits and says why.

use std::time::Duration;

use p2p_tests::fake::{self, Behaviour};
use p2p_tests::{eventually, file_sha256, write_random, Daemon, Swarm};

#[test]
fn a_peer_sending_wrong_bytes_is_caught_banned_and_the_file_is_still_right() {
    // The honest seeder is slow, so the liar gets asked for plenty of chunks.
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "2000000"]);
    swarm.add_daemon(&[]);
    let file = swarm.path("target.bin");
    write_random(&file, 2 << 20, 40);
    swarm.daemons[0].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    let liar = fake::start(swarm.tracker.addr, &file, 65536, Behaviour::Corrupt);

    let out = swarm.path("got.bin");
    let leecher = &swarm.daemons[1];
    let doc = leecher.ctl_json(&["download", "target.bin", "-o", out.to_str().unwrap()]);
    assert_eq!(file_sha256(&out), file_sha256(&file));
    let sources: Vec<&str> = doc["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        !sources.contains(&liar.addr.to_string().as_str()),
        "no chunk from the liar"
    );
    let log = leecher.proc.log();
    assert!(
        log.contains("chunk failed verification; discarded"),
        "{log}"
    );
    assert_eq!(
        leecher.proc.count("peer banned from this download"),
        1,
        "{log}"
    );
    assert!(leecher.download_status()["wasted"].as_u64().unwrap() >= 2 * 65536);
    // Banned: after two strikes it is asked for nothing more. Before the second strike is
    // known, the worker may have asked for a window (16) more, and have 3 chunks in hand.
    let asked = liar.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(asked <= 2 + 16 + 3, "the liar was asked for {asked} chunks");
}

/// From a lone peer, chunks are hashed on other threads rather than as they arrive (see
/// `Worker::hash_inline`): that path must catch bad data just the same.
#[test]
fn a_lone_lying_peer_is_banned_and_nothing_it_sent_is_kept() {
    let mut swarm = Swarm::new(1, "30s", &[]);
    let file = swarm.path("lone.bin");
    write_random(&file, 1 << 20, 44);
    let liar = fake::start(swarm.tracker.addr, &file, 65536, Behaviour::Corrupt);
    let out = swarm.path("got.bin");
    let leecher = &swarm.daemons[0];
    leecher.ctl_json(&[
        "download",
        "lone.bin",
        "-o",
        out.to_str().unwrap(),
        "--detach",
    ]);
    leecher
        .proc
        .wait_for("peer banned from this download", Duration::from_secs(20));
    let d = leecher.download_status();
    assert_eq!(d["have"], 0, "nothing from the liar is kept: {d}");
    assert_eq!(d["state"]["state"], "running", "{d}");
    assert!(d["wasted"].as_u64().unwrap() >= 2 * 65536, "{d}");
    assert!(!out.exists(), "never complete early");
    assert!(liar.requests.load(std::sync::atomic::Ordering::SeqCst) >= 2);

    // An honest holder appears: the file completes, and right.
    let i = swarm.add_daemon(&[]);
    swarm.daemons[i].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    swarm.daemons[0].wait_complete(Duration::from_secs(60));
    assert_eq!(file_sha256(&out), file_sha256(&file));
}

#[test]
fn silent_and_dripping_peers_are_timed_out_and_their_chunks_go_elsewhere() {
    // At first only a silent peer and a dripping one hold the file.
    let mut swarm = Swarm::new(0, "30s", &[]);
    swarm.add_daemon(&["--request-timeout", "1s"]);
    let file = swarm.path("slow.bin");
    write_random(&file, 2 << 20, 41);
    let silent = fake::start(swarm.tracker.addr, &file, 65536, Behaviour::Silent);
    let drip = fake::start(swarm.tracker.addr, &file, 65536, Behaviour::Drip);
    let out = swarm.path("got.bin");
    let leecher = 0;
    swarm.daemons[leecher].ctl_json(&[
        "download",
        "slow.bin",
        "-o",
        out.to_str().unwrap(),
        "--detach",
    ]);

    // Both are asked, both time out; nothing is taken from them.
    let timed_out = eventually(Duration::from_secs(20), || {
        let n = swarm.daemons[leecher]
            .proc
            .count("stopped fetching from this peer: less than");
        (n >= 2).then_some(n)
    });
    assert!(timed_out.is_some(), "{}", swarm.daemons[leecher].proc.log());
    let asked = |p: &fake::FakePeer| p.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        asked(&silent) > 0 && asked(&drip) > 0,
        "both bad peers were tried"
    );
    assert_eq!(swarm.daemons[leecher].download_status()["have"], 0);
    assert!(!out.exists());

    // An honest seeder appears: the requests go to it and the download finishes.
    let honest = swarm.add_daemon(&[]);
    swarm.daemons[honest].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    swarm.daemons[leecher].wait_complete(Duration::from_secs(60));
    assert_eq!(file_sha256(&out), file_sha256(&file));
}

#[test]
fn a_seeder_killed_mid_transfer_leaves_the_rest_to_the_others() {
    let mut swarm = Swarm::new(2, "30s", &["--upload-rate", "4000000"]);
    swarm.add_daemon(&[]);
    let file = swarm.path("f.bin");
    write_random(&file, 8 << 20, 42);
    for d in &swarm.daemons[..2] {
        d.ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    }
    let out = swarm.path("got.bin");
    swarm.daemons[2].ctl_json(&["download", "f.bin", "-o", out.to_str().unwrap(), "--detach"]);
    eventually(Duration::from_secs(30), || {
        (swarm.daemons[2].download_status()["have"].as_u64()? >= 20).then_some(())
    })
    .expect("no progress");
    swarm.daemons[0].proc.kill();
    swarm.daemons[2].wait_complete(Duration::from_secs(60));
    assert_eq!(file_sha256(&out), file_sha256(&file));
}

#[test]
fn with_no_live_holder_a_download_stalls_says_so_and_continues_when_one_appears() {
    let mut swarm = Swarm::new(1, "1s", &["--upload-rate", "2000000"]);
    swarm.add_daemon(&[]);
    let file = swarm.path("lonely.bin");
    write_random(&file, 4 << 20, 43);
    swarm.daemons[0].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    let out = swarm.path("got.bin");
    let leecher_i = 1;
    swarm.daemons[leecher_i].ctl_json(&[
        "download",
        "lonely.bin",
        "-o",
        out.to_str().unwrap(),
        "--detach",
    ]);
    eventually(Duration::from_secs(30), || {
        (swarm.daemons[leecher_i].download_status()["have"].as_u64()? >= 8).then_some(())
    })
    .expect("no progress");
    swarm.daemons[0].proc.kill();

    // Once the tracker drops the dead seeder, the missing chunks have no live holder.
    let stalled = eventually(Duration::from_secs(15), || {
        let d = swarm.daemons[leecher_i].download_status();
        (d["stalled"].as_u64()? > 0).then_some(d)
    })
    .expect("the download never reported being stalled");
    assert_eq!(stalled["state"]["state"], "running", "{stalled}");
    assert!(!out.exists(), "never complete early");
    let prose = swarm.daemons[leecher_i].ctl(&["status"]).ok();
    assert!(prose.contains("chunks have no live holder"), "{prose}");

    // A new holder appears: the download carries on and finishes.
    let i = swarm.add_daemon(&[]);
    swarm.daemons[i].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    swarm.daemons[leecher_i].wait_complete(Duration::from_secs(60));
    assert_eq!(file_sha256(&out), file_sha256(&file));
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[test]
fn twenty_daemons_download_at_once_and_the_seeder_memory_stays_bounded() {
    let mut swarm = Swarm::new(1, "30s", &[]);
    for _ in 0..20 {
        swarm.add_daemon(&[]);
    }
    let file = swarm.path("popular.bin");
    write_random(&file, 16 << 20, 44);
    swarm.daemons[0].ctl_json(&["register", file.to_str().unwrap()]);
    let want = file_sha256(&file);
    std::thread::scope(|s| {
        let jobs: Vec<_> = swarm.daemons[1..]
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let out = swarm.path(&format!("copy{i}.bin"));
                s.spawn(move || {
                    d.ctl(&["-q", "download", "popular.bin", "-o", out.to_str().unwrap()])
                        .ok();
                    out
                })
            })
            .collect();
        for j in jobs {
            let out = j.join().expect("download thread");
            assert_eq!(file_sha256(&out), want, "{}", out.display());
        }
    });
    let rss = peak_rss_kib(swarm.daemons[0].proc.pid());
    eprintln!("seeder peak RSS with 20 downloaders: {} MiB", rss / 1024);
    assert!(rss < 96 * 1024, "seeder peak RSS {rss} KiB");
}

#[test]
fn a_lying_tracker_can_neither_substitute_hashes_nor_make_a_download_escape_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 241) as u8).collect();
    let manifest = fake::manifest_of("honest.bin", &data, 4096);
    for (lie, expected) in [
        (fake::Lie::EscapingName, "invalid file name"),
        (fake::Lie::SwappedHashes, "does not match file ID"),
    ] {
        let tracker = fake::start_tracker(manifest.clone(), lie);
        let peer = dir.path().join(format!("{lie:?}"));
        let d = Daemon::start(&peer, tracker.addr, &[]);
        let downloads = peer.join("downloads");
        let err = d.ctl(&["download", "honest.bin"]).fails();
        assert!(err.contains("the tracker sent a bad manifest"), "{err}");
        assert!(err.contains(expected), "{err}");
        assert!(d.status()["downloads"].as_array().unwrap().is_empty());
        assert!(!dir.path().join("escaped.bin").exists());
        assert!(!peer.join("escaped.bin").exists());
        let left: Vec<_> = std::fs::read_dir(&downloads)
            .map(|r| r.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "nothing written: {left:?}");
    }
}

#[test]
fn holders_that_refuse_every_chunk_or_answer_wrongly_give_up_their_slots() {
    // 32 holders (as many as a download fetches from at once) refuse every chunk they
    // announced, and 2 answer with the wrong length; only then does an honest seeder appear.
    let mut swarm = Swarm::new(0, "30s", &[]);
    let leecher = swarm.add_daemon(&[]);
    let file = swarm.path("refused.bin");
    write_random(&file, 4 << 20, 51);
    let refusers: Vec<_> = (0..32)
        .map(|_| fake::start(swarm.tracker.addr, &file, 65536, Behaviour::Refuse))
        .collect();
    let wrong: Vec<_> = (0..2)
        .map(|_| fake::start(swarm.tracker.addr, &file, 65536, Behaviour::WrongLength))
        .collect();
    let out = swarm.path("got.bin");
    swarm.daemons[leecher].ctl_json(&[
        "download",
        "refused.bin",
        "-o",
        out.to_str().unwrap(),
        "--detach",
    ]);
    let asked = |p: &fake::FakePeer| p.requests.load(std::sync::atomic::Ordering::SeqCst);
    let all_asked = eventually(Duration::from_secs(20), || {
        (refusers.iter().filter(|p| asked(p) > 0).count() >= 16).then_some(())
    });
    assert!(all_asked.is_some(), "{}", swarm.daemons[leecher].proc.log());
    // Time for the refusers to take every slot, if they could keep them.
    std::thread::sleep(Duration::from_secs(3));

    let honest = swarm.add_daemon(&[]);
    swarm.daemons[honest].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    swarm.daemons[leecher].wait_complete(Duration::from_secs(60));
    assert_eq!(file_sha256(&out), file_sha256(&file));
    let log = swarm.daemons[leecher].proc.log();
    assert!(
        log.contains("refused chunk after chunk"),
        "refusers were never told apart: {log}"
    );
    assert!(
        log.contains("for chunk") && log.contains("answered chunk"),
        "a wrong length was not noticed: {log}"
    );
    drop(wrong);
}

#[test]
fn holders_that_keep_faulting_are_set_aside_and_asked_no_more() {
    let mut swarm = Swarm::new(0, "30s", &[]);
    let leecher = swarm.add_daemon(&[]);
    let file = swarm.path("faulty.bin");
    write_random(&file, 1 << 20, 52);
    let refuser = fake::start(swarm.tracker.addr, &file, 65536, Behaviour::Refuse);
    let wrong = fake::start(swarm.tracker.addr, &file, 65536, Behaviour::WrongLength);
    let out = swarm.path("got.bin");
    swarm.daemons[leecher].ctl_json(&[
        "download",
        "faulty.bin",
        "-o",
        out.to_str().unwrap(),
        "--detach",
    ]);
    // Three faulty sessions each (waits of 2 s, then 4 s), then set aside.
    let set_aside = eventually(Duration::from_secs(30), || {
        let n = swarm.daemons[leecher]
            .proc
            .count("peer set aside from this download");
        (n >= 2).then_some(())
    });
    assert!(set_aside.is_some(), "{}", swarm.daemons[leecher].proc.log());
    let asked = |p: &fake::FakePeer| p.requests.load(std::sync::atomic::Ordering::SeqCst);
    let (refused, wronged) = (asked(&refuser), asked(&wrong));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        (asked(&refuser), asked(&wrong)),
        (refused, wronged),
        "a set-aside peer was asked again"
    );
    assert_eq!(swarm.daemons[leecher].download_status()["have"], 0);
}

#[test]
fn a_slow_peer_that_keeps_sending_is_waited_for_past_the_request_timeout() {
    // 4 MiB chunks from an uplink of 1 MB/s: each chunk takes 4 s, twice the timeout.
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "1000000"]);
    let leecher = swarm.add_daemon(&["--request-timeout", "2s"]);
    let file = swarm.path("slow.bin");
    write_random(&file, 8 << 20, 53);
    let id = swarm.daemons[0].ctl_json(&[
        "register",
        file.to_str().unwrap(),
        "--chunk-size",
        "4194304",
    ])["file"]["id"]
        .as_str()
        .expect("file id")
        .to_string();
    let out = swarm.path("slow-copy.bin");
    swarm.daemons[leecher].ctl_json(&["download", &id, "-o", out.to_str().unwrap(), "--detach"]);
    swarm.daemons[leecher].wait_complete(Duration::from_secs(40));
    assert_eq!(file_sha256(&out), file_sha256(&file));
    let log = swarm.daemons[leecher].proc.log();
    assert!(!log.contains("stopped fetching from this peer"), "{log}");
}
