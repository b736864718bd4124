//! The prototype's features, each working between real processes on loopback, and the
//! prototype's failures, fixed.

use std::collections::BTreeSet;
use std::time::Duration;

use p2p_tests::{eventually, file_sha256, sample, write_random, Daemon, Swarm};
use sha2::{Digest, Sha256};

fn sources(doc: &serde_json::Value) -> BTreeSet<String> {
    doc["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .map(|s| s.as_str().expect("address").to_string())
        .collect()
}

#[test]
fn register_list_locate_download_and_quit() {
    let mut swarm = Swarm::new(3, "30s", &[]);
    let doug = sample("doug.png");
    let size = std::fs::metadata(&doug).unwrap().len();

    let out = swarm.daemons[0]
        .ctl(&["register", doug.to_str().unwrap()])
        .ok();
    assert!(
        out.starts_with(&format!(
            "Registration of doug.png of size {size} bytes successful."
        )),
        "{out}"
    );
    // The alias works too, and the same bytes from a second peer are the same file.
    swarm.daemons[1].ctl(&["r", doug.to_str().unwrap()]).ok();

    let list = swarm.daemons[2].ctl(&["lst"]).ok();
    assert!(
        list.starts_with("There are currently 1 files in the network.\n"),
        "{list}"
    );
    assert!(
        list.contains(&format!("(1) Name: doug.png Size: {size} bytes ID: ")),
        "{list}"
    );

    let loc = swarm.daemons[2].ctl(&["loc", "doug.png"]).ok();
    assert!(
        loc.starts_with("There are 2 endpoints seeding this file.\n"),
        "{loc}"
    );
    for d in &swarm.daemons[..2] {
        let line = format!("Peer {} currently has chunks [1, 2, 3, 4, 5, 6].", d.addr);
        assert!(loc.contains(&line), "{line} missing from:\n{loc}");
    }

    let out_path = swarm.path("doug-copy.png");
    let got = swarm.daemons[2]
        .ctl(&["d", "doug.png", "--output", out_path.to_str().unwrap()])
        .ok();
    assert!(got.contains("doug.png has completed downloading."), "{got}");
    assert!(got.contains(out_path.to_str().unwrap()), "{got}");
    assert_eq!(
        std::fs::read(&out_path).unwrap(),
        std::fs::read(&doug).unwrap()
    );
    assert!(
        !swarm.path("doug-copy.png.part").exists(),
        "no partial file left"
    );

    // Quit: the daemon leaves, exits 0, and the tracker drops it at once.
    let bye = swarm.daemons[1].ctl(&["q"]).ok();
    assert!(bye.contains("leaving"), "{bye}");
    let status = swarm.daemons[1].proc.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(!swarm.daemons[1].socket.exists(), "socket removed on exit");
    let gone = format!(
        "{} has disconnected. 2 peers on network.",
        swarm.daemons[1].addr
    );
    swarm.tracker.proc.wait_for(&gone, Duration::from_secs(5));
    let loc = swarm.daemons[2].ctl(&["locate", "doug.png"]).ok();
    assert!(loc.starts_with("There are 2 endpoints"), "{loc}");
    assert!(!loc.contains(&swarm.daemons[1].addr.to_string()), "{loc}");
}

#[test]
fn tracker_logs_peers_joining_in_the_prototypes_words() {
    let swarm = Swarm::new(2, "30s", &[]);
    for (i, d) in swarm.daemons.iter().enumerate() {
        let line = format!("{} has connected. {} peers on network.", d.addr, i + 1);
        swarm.tracker.proc.wait_for(&line, Duration::from_secs(5));
    }
}

#[test]
fn registering_several_files() {
    let swarm = Swarm::new(2, "30s", &[]);
    let extra = swarm.path("extra.bin");
    write_random(&extra, 300_000, 1);
    for f in [sample("doug.png"), sample("sample.txt"), extra.clone()] {
        swarm.daemons[0].register(&f);
    }
    let doc = swarm.daemons[1].ctl_json(&["list"]);
    let names: BTreeSet<&str> = doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["doug.png", "extra.bin", "sample.txt"])
    );
    let list = swarm.daemons[1].ctl(&["list"]).ok();
    assert!(
        list.starts_with("There are currently 3 files in the network."),
        "{list}"
    );
}

#[test]
fn downloading_from_several_peers() {
    // Seeders limited to 1 MB/s each, so both are busy at once.
    let mut swarm = Swarm::new(2, "30s", &["--upload-rate", "1000000"]);
    swarm.add_daemon(&[]);
    let file = swarm.path("two-mib.bin");
    write_random(&file, 2 << 20, 2);
    swarm.daemons[0].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    swarm.daemons[1].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);

    let out = swarm.path("out.bin");
    let leecher = &swarm.daemons[2];
    let doc = leecher.ctl_json(&["download", "two-mib.bin", "-o", out.to_str().unwrap()]);
    assert_eq!(file_sha256(&out), file_sha256(&file));
    let from = sources(&doc);
    let seeders: BTreeSet<String> = swarm.daemons[..2]
        .iter()
        .map(|d| d.addr.to_string())
        .collect();
    assert_eq!(from, seeders, "chunks came from both seeders");
    assert_eq!(doc["chunks"].as_array().unwrap().len(), 32);

    // The prose form with -v names the peer of every chunk.
    let out2 = swarm.path("out2.bin");
    let fourth_dir = swarm.path("peer4");
    let fourth = Daemon::start(&fourth_dir, swarm.tracker.addr, &[]);
    let verbose = fourth
        .ctl(&[
            "-v",
            "download",
            "two-mib.bin",
            "-o",
            out2.to_str().unwrap(),
        ])
        .ok();
    let received: Vec<&str> = verbose
        .lines()
        .filter(|l| l.starts_with("Received chunk "))
        .collect();
    assert_eq!(received.len(), 32, "{verbose}");
    assert!(
        received
            .iter()
            .all(|l| l.contains(" of 32 from 127.0.0.1:")),
        "{verbose}"
    );
    assert_eq!(file_sha256(&out2), file_sha256(&file));
}

#[test]
fn a_chunk_is_seeded_once_downloaded() {
    // A slow seeder, so the first downloader is seen holding part of the file.
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "400000"]);
    swarm.add_daemon(&[]);
    swarm.add_daemon(&[]);
    let file = swarm.path("one-mib.bin");
    write_random(&file, 1 << 20, 3);
    swarm.daemons[0].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "32768"]);
    let (seeder, first, second) = (&swarm.daemons[0], &swarm.daemons[1], &swarm.daemons[2]);

    let first_out = swarm.path("first.bin");
    first.ctl_json(&[
        "download",
        "one-mib.bin",
        "-o",
        first_out.to_str().unwrap(),
        "--detach",
    ]);
    // While it downloads, the tracker already lists it holding some chunks, not all.
    let partial = eventually(Duration::from_secs(20), || {
        let doc = second.ctl_json(&["locate", "one-mib.bin"]);
        doc["holders"].as_array().unwrap().iter().find_map(|h| {
            let n = h["chunks"].as_array().unwrap().len();
            (h["addr"] == first.addr.to_string() && n > 0 && n < 32).then_some(n)
        })
    });
    assert!(
        partial.is_some(),
        "the downloader never announced a partial holding"
    );
    let done = eventually(Duration::from_secs(30), || {
        let s = first.status();
        (s["downloads"][0]["state"]["state"] == "complete").then_some(())
    });
    assert!(
        done.is_some(),
        "first download never completed: {}",
        first.status()
    );

    // The original seeder leaves; the second downloader must get everything from the first.
    seeder.ctl(&["quit"]).ok();
    let second_out = swarm.path("second.bin");
    let doc = second.ctl_json(&[
        "download",
        "one-mib.bin",
        "-o",
        second_out.to_str().unwrap(),
    ]);
    assert_eq!(sources(&doc), BTreeSet::from([first.addr.to_string()]));
    assert_eq!(file_sha256(&second_out), file_sha256(&file));
}

#[test]
fn split_and_merge_are_bit_identical_at_edge_sizes() {
    let swarm = Swarm::new(2, "30s", &[]);
    let cs = 1024usize;
    for (i, size) in [0, 1, cs - 1, cs, cs + 1, 3 * cs, (3 << 20) + 7]
        .into_iter()
        .enumerate()
    {
        let name = format!("edge-{size}.bin");
        let src = swarm.path(&name);
        write_random(&src, size, 10 + i as u64);
        let mut args = vec!["register", src.to_str().unwrap()];
        if size < 1 << 20 {
            args.extend(["--chunk-size", "1024"]);
        }
        let doc = swarm.daemons[0].ctl_json(&args);
        // Above 1 MiB the automatic size applies: 64 KiB, so 48 full chunks and one of 7 bytes.
        let expected_chunks = if size < 1 << 20 {
            size.div_ceil(cs)
        } else {
            49
        };
        assert_eq!(doc["file"]["chunks"], expected_chunks, "{size}: {doc}");
        let dst = swarm.path(&format!("copy-{name}"));
        swarm.daemons[1].ctl_json(&["download", &name, "-o", dst.to_str().unwrap()]);
        assert_eq!(
            std::fs::read(&dst).unwrap(),
            std::fs::read(&src).unwrap(),
            "size {size}"
        );
    }
}

/// The file ID, computed independently of the daemon from the documented formula.
fn expected_id(data: &[u8], chunk_size: usize) -> String {
    let mut id = Sha256::new();
    id.update(b"p2p-file-v1\0");
    id.update((data.len() as u64).to_be_bytes());
    id.update((chunk_size as u32).to_be_bytes());
    for chunk in data.chunks(chunk_size) {
        id.update(Sha256::digest(chunk));
    }
    p2p_schema::to_hex(&id.finalize())
}

#[test]
fn hashing_gives_the_documented_content_id() {
    let swarm = Swarm::new(1, "30s", &[]);
    let doug = sample("doug.png");
    let data = std::fs::read(&doug).unwrap();
    let doc = swarm.daemons[0].ctl_json(&["register", doug.to_str().unwrap()]);
    assert_eq!(doc["file"]["chunk_size"], 16384);
    assert_eq!(doc["file"]["chunks"], data.len().div_ceil(16384));
    assert_eq!(doc["file"]["id"], expected_id(&data, 16384));

    let text = sample("sample.txt");
    let data = std::fs::read(&text).unwrap();
    let doc =
        swarm.daemons[0].ctl_json(&["register", text.to_str().unwrap(), "--chunk-size", "2048"]);
    assert_eq!(doc["file"]["id"], expected_id(&data, 2048));
}

#[test]
fn unknown_and_invalid_names_are_clear_errors_and_the_daemon_stays_healthy() {
    let swarm = Swarm::new(2, "30s", &[]);
    let d = &swarm.daemons[1];
    swarm.daemons[0].register(&sample("doug.png"));

    let err = d.ctl(&["download", "nothing.png"]).fails();
    assert!(
        err.starts_with("error: no file named \"nothing.png\""),
        "{err}"
    );
    let err = d.ctl(&["locate", "nothing.png"]).fails();
    assert!(err.contains("no file named"), "{err}");
    let err = d.ctl(&["download", "../../etc/passwd"]).fails();
    assert!(err.contains("no file named"), "{err}");
    let err = d.ctl(&["register", "/definitely/not/here.bin"]).fails();
    assert!(err.contains("no such file"), "{err}");
    // A socket (the daemon's own) is neither a file nor a directory.
    let err = d.ctl(&["register", d.socket.to_str().unwrap()]).fails();
    assert!(err.contains("not a regular file"), "{err}");
    let err = d
        .ctl(&["download", "doug.png", "-o", "/definitely/not/here/x.png"])
        .fails();
    assert!(err.contains("does not exist"), "{err}");
    assert!(d.ctl(&["--json", "download", "nothing.png"]).json()["error"]["code"] == "not_found");

    // Still healthy: it lists, and downloads.
    assert!(d.ctl(&["list"]).ok().contains("doug.png"));
    let out = swarm.path("ok.png");
    d.ctl(&["download", "doug.png", "-o", out.to_str().unwrap()])
        .ok();
    assert_eq!(file_sha256(&out), file_sha256(&sample("doug.png")));
    // Downloading it again is refused before any transfer.
    let err = d.ctl(&["download", "doug.png"]).fails();
    assert!(err.contains("already has doug.png"), "{err}");
}

#[test]
fn an_ambiguous_name_lists_the_candidates_and_an_id_prefix_resolves_it() {
    let swarm = Swarm::new(2, "30s", &[]);
    let (a, b) = (swarm.path("a"), swarm.path("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    write_random(&a.join("same.bin"), 5000, 4);
    write_random(&b.join("same.bin"), 6000, 5);
    let id_a = swarm.daemons[0].register(&a.join("same.bin"));
    let id_b = swarm.daemons[0].register(&b.join("same.bin"));
    assert_ne!(id_a, id_b);

    let err = swarm.daemons[1].ctl(&["download", "same.bin"]).fails();
    assert!(err.contains("matches 2 files"), "{err}");
    assert!(err.contains(&id_a) && err.contains(&id_b), "{err}");

    // A unique prefix picks one.
    let out = swarm.path("picked.bin");
    swarm.daemons[1]
        .ctl(&["download", &id_b[..10], "-o", out.to_str().unwrap()])
        .ok();
    assert_eq!(file_sha256(&out), file_sha256(&b.join("same.bin")));
}

#[test]
fn a_killed_peer_is_dropped_within_the_ttl() {
    let mut swarm = Swarm::new(2, "1s", &[]);
    let doug = sample("doug.png");
    swarm.daemons[0].register(&doug);
    swarm.daemons[1].register(&doug);
    let victim = swarm.daemons[0].addr.to_string();
    swarm.daemons[0].proc.kill();
    // TTL 1 s, checked every 250 ms: gone well within 3 s.
    let gone = format!("{victim} has disconnected. 1 peers on network.");
    swarm.tracker.proc.wait_for(&gone, Duration::from_secs(3));
    let doc = swarm.daemons[1].ctl_json(&["locate", "doug.png"]);
    let holders = doc["holders"].as_array().unwrap();
    assert_eq!(holders.len(), 1, "{doc}");
    assert_ne!(holders[0]["addr"], victim.as_str());
}

#[test]
fn five_peers_downloading_one_file_at_once_all_end_identical() {
    let mut swarm = Swarm::new(1, "30s", &[]);
    for _ in 0..5 {
        swarm.add_daemon(&[]);
    }
    let file = swarm.path("shared.bin");
    write_random(&file, 4 << 20, 6);
    swarm.daemons[0].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    let want = file_sha256(&file);
    std::thread::scope(|s| {
        let handles: Vec<_> = swarm.daemons[1..]
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let out = swarm.path(&format!("leech{i}.bin"));
                s.spawn(move || {
                    d.ctl(&["download", "shared.bin", "-o", out.to_str().unwrap()])
                        .ok();
                    out
                })
            })
            .collect();
        for h in handles {
            let out = h.join().expect("a download thread panicked");
            assert_eq!(file_sha256(&out), want, "{}", out.display());
        }
    });
}

#[test]
fn p2pctl_without_a_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let out = std::process::Command::new(p2p_tests::bin("p2pctl"))
        .arg("--socket")
        .arg(&sock)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        format!(
            "error: no daemon at {}: is p2pd running? (start it with 'systemctl --user start p2pd' or 'p2pd --daemon', or point --socket at its socket)",
            sock.display()
        )
    );
    // Usage errors exit 2.
    let out = std::process::Command::new(p2p_tests::bin("p2pctl"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn every_command_speaks_json() {
    let swarm = Swarm::new(2, "30s", &[]);
    let d = &swarm.daemons[0];
    let doc = d.ctl_json(&["register", sample("sample.txt").to_str().unwrap()]);
    assert_eq!(doc["file"]["name"], "sample.txt");
    let doc = d.ctl_json(&["list"]);
    assert_eq!(doc["files"][0]["name"], "sample.txt");
    let doc = d.ctl_json(&["locate", "sample.txt"]);
    assert_eq!(doc["holders"][0]["addr"], d.addr.to_string());
    let out = swarm.path("s.txt");
    let doc = swarm.daemons[1].ctl_json(&["download", "sample.txt", "-o", out.to_str().unwrap()]);
    assert_eq!(doc["output"], out.to_str().unwrap());
    let doc = swarm.daemons[1].ctl_json(&["status"]);
    assert_eq!(doc["downloads"][0]["state"]["state"], "complete");
    assert_eq!(doc["shares"][0]["name"], "sample.txt");
    let doc = swarm.daemons[1].ctl_json(&["quit"]);
    assert_eq!(doc["ok"], true);
}

#[test]
fn a_small_in_flight_window_with_several_peers_still_ends_bit_identical() {
    // The fast path (direct I/O, overlapped verification) with one request in flight per
    // peer, against three seeders and one that lies: every chunk is still verified.
    let mut swarm = Swarm::new(3, "30s", &[]);
    let leecher = swarm.add_daemon(&["--max-in-flight", "1"]);
    let file = swarm.path("window.bin");
    write_random(&file, 6 << 20, 7);
    for d in &swarm.daemons[..3] {
        d.ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    }
    let liar = p2p_tests::fake::start(
        swarm.tracker.addr,
        &file,
        65536,
        p2p_tests::fake::Behaviour::Corrupt,
    );
    let out = swarm.path("window-copy.bin");
    let doc =
        swarm.daemons[leecher].ctl_json(&["download", "window.bin", "-o", out.to_str().unwrap()]);
    assert_eq!(file_sha256(&out), file_sha256(&file));
    assert!(sources(&doc).len() >= 2, "{doc}");
    assert!(!sources(&doc).contains(&liar.addr.to_string()));
    assert!(
        liar.requests.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the liar was asked"
    );
}
