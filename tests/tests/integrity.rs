//! Integrity of what the programs keep and read: a registry is never lost to a second
//! tracker, malformed answers are errors rather than panics, and large answers are paged.

use std::process::Command;
use std::time::Duration;

use p2p_tests::{bin, sample, Daemon, Proc, Tracker, STARTUP};

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
