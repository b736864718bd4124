//! Integrity of what the programs keep and read: a registry is never lost to a second
//! tracker, malformed answers are errors rather than panics, and large answers are paged.

use std::process::Command;
use std::time::Duration;

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
    let names: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["registry.sled"], "nothing moved aside");
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
