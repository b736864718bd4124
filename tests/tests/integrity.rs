//! Integrity of what the programs keep and read: a registry is never lost to a second
//! tracker, malformed answers are errors rather than panics, and large answers are paged.

use std::process::Command;
use std::time::Duration;

use p2p_schema::frame::encode_frame;
use p2p_schema::{Manifest, TrackerRequest, TrackerResponse, PROTOCOL_VERSION};
use p2p_tests::{bin, eventually, fake, sample, Daemon, Proc, Tracker, STARTUP};

/// The tracker's `stats --json` document.
fn tracker_stats(tracker: &Tracker) -> serde_json::Value {
    let out = Command::new(bin("p2p-tracker"))
        .args(["stats", "--json", "--tracker", &tracker.addr.to_string()])
        .output()
        .expect("running p2p-tracker stats");
    assert!(out.status.success(), "stats failed: {out:?}");
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

#[test]
fn a_second_tracker_on_a_live_data_dir_exits_and_the_registry_survives() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tracker");
    let mut first = Tracker::start(&data, "30s");
    let mut daemon = Daemon::start(&dir.path().join("peer"), first.addr, &[]);
    daemon.register(&sample("sample.txt"));
    // Killed: it neither says goodbye nor re-announces, so only the registry keeps the file.
    daemon.proc.kill();

    let mut cmd = Command::new(bin("p2p-tracker"));
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data);
    let mut second = Proc::spawn("second p2p-tracker", cmd);
    let status = second.wait_exit(STARTUP);
    assert_eq!(status.code(), Some(1), "{}", second.log());
    let expected = format!(
        "another p2p-tracker is using {} (pid {})",
        data.display(),
        first.proc.pid()
    );
    assert!(second.log().contains(&expected), "{}", second.log());
    assert!(!second.log().contains("listening on"), "{}", second.log());
    let mut names: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // The registry and the first tracker's key: nothing moved aside.
    assert_eq!(
        names,
        vec!["registry.sled", "tracker.key", "tracker.pub"],
        "nothing moved aside"
    );
    assert_eq!(tracker_stats(&first)["files"], 1);

    // The first stops and starts again: the file is still there.
    first.proc.signal(libc::SIGTERM);
    first.proc.wait_exit(Duration::from_secs(10));
    let again = Tracker::start(&data, "30s");
    again
        .proc
        .wait_for("registry loaded files=1", Duration::from_secs(5));
    assert_eq!(tracker_stats(&again)["files"], 1);
}

#[test]
fn a_tracker_sending_malformed_holders_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 241) as u8).collect();
    let manifest = fake::manifest_of("honest.bin", &data, 4096);
    let tracker = fake::start_tracker(manifest, fake::Lie::MalformedHolders);
    let d = Daemon::start(&dir.path().join("peer"), tracker.addr, &[]);

    // A download asks for holders again and again: each malformed answer is logged, and
    // the coordinator neither panics nor loses the daemon.
    d.ctl(&["download", "honest.bin", "--detach"]).ok();
    eventually(Duration::from_secs(10), || {
        (d.proc.count("the tracker sent a malformed answer") >= 2).then_some(())
    })
    .unwrap_or_else(|| panic!("no malformed answer logged twice: {}", d.proc.log()));
    assert_eq!(d.download_status()["state"]["state"], "running");
    assert!(!d.proc.log().contains("panicked"), "{}", d.proc.log());

    // `locate` is a one-line error, exit 1, not a panic.
    let out = d.ctl(&["locate", "honest.bin"]);
    assert!(!out.stderr.contains("panicked"), "{out:#?}");
    let err = out.fails();
    assert!(err.contains("sent a malformed answer"), "{err}");
    assert!(
        err.contains("bitfield of 1000000 chunks carries 1 bytes"),
        "{err}"
    );
    assert!(!d.proc.log().contains("panicked"), "{}", d.proc.log());
}

/// Registers `count` one-chunk files with names of 255 bytes through a raw session as one
/// peer, pipelined; returns the session (the files live while it does).
fn register_many(tracker: std::net::SocketAddr, count: u32) -> p2p_tests::secure::SecureConn {
    use std::io::Write;
    let mut s = p2p_tests::secure::connect(tracker, None, None).unwrap();
    let mut buf = Vec::new();
    encode_frame(
        &TrackerRequest::Hello {
            version: PROTOCOL_VERSION,
            listen: "127.0.0.1:9".parse().unwrap(),
            agent: "many".into(),
        },
        &mut buf,
    )
    .unwrap();
    s.write_all(&buf).unwrap();
    assert!(matches!(
        fake::read_frame::<TrackerResponse>(&mut s).unwrap(),
        Some(TrackerResponse::Welcome { .. })
    ));
    // Pipelined in batches; each batch's answers are read before the next goes out.
    let mut batch = Vec::new();
    let mut unanswered = 0;
    for i in 0..count {
        let mut hashes = vec![0u8; 32];
        hashes[..4].copy_from_slice(&i.to_be_bytes());
        let manifest = Manifest {
            collection: false,
            name: format!("{i:0>10}-{}", "n".repeat(244)),
            size: 1,
            chunk_size: 1024,
            hashes: hashes.into(),
        };
        encode_frame(&TrackerRequest::Register {
                manifest,
                member: false,
            },
            &mut batch).unwrap();
        unanswered += 1;
        if unanswered == 500 || i + 1 == count {
            s.write_all(&batch).unwrap();
            batch.clear();
            for _ in 0..unanswered {
                match fake::read_frame::<TrackerResponse>(&mut s) {
                    Ok(Some(TrackerResponse::Registered { .. })) => {}
                    other => panic!("registering: {other:?}"),
                }
            }
            unanswered = 0;
        }
    }

    s
}

#[test]
fn a_list_larger_than_a_frame_is_paged_and_shows_every_file() {
    // 28,000 names of 255 bytes: about 10 MB of summaries, over the 9 MiB frame limit.
    const FILES: u32 = 28_000;
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(&dir.path().join("tracker"), "120s");
    let started = std::time::Instant::now();
    let _session = register_many(tracker.addr, FILES);
    eprintln!("registered {FILES} files in {:?}", started.elapsed());
    let d = Daemon::start(&dir.path().join("peer"), tracker.addr, &[]);
    let doc = d.ctl_json(&["list"]);
    let files = doc["files"].as_array().expect("files");
    assert_eq!(files.len(), FILES as usize);
    // In order, each once.
    let first = format!("{:0>10}-", 0);
    let last = format!("{:0>10}-", FILES - 1);
    assert!(files[0]["name"].as_str().unwrap().starts_with(&first));
    assert!(files[FILES as usize - 1]["name"]
        .as_str()
        .unwrap()
        .starts_with(&last));
    // The session survived: the daemon is still connected and the list works again.
    assert!(
        !d.proc.log().contains("lost the tracker session"),
        "{}",
        d.proc.log()
    );
    let text = d.ctl(&["list"]).ok();
    assert!(
        text.starts_with(&format!("There are currently {FILES} files")),
        "{}",
        &text[..200.min(text.len())]
    );
}
