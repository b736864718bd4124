//! An upgraded tracker and daemon keep what the previous release wrote. The state in
//! `tests/fixtures/upgrade-v1.tar.gz` was written by the release before collections (commit
//! ea65fe9) under `/tmp/p2p-upgrade-v1`: a tracker's registry with two files, a daemon `a`
//! sharing both, a daemon `b` with a paused download holding 2 of 8 chunks. How it was made:
//! `tests/fixtures/README.md`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use p2p_tests::{eventually, file_sha256, sample, Daemon, Tracker};

/// Where the previous release wrote it: records hold absolute paths.
const ROOT: &str = "/tmp/p2p-upgrade-v1";
const CHUNK: u64 = 32 << 10;

/// `big.bin`'s bytes, as the fixture's maker wrote them.
fn big() -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while out.len() < 256 << 10 {
        out.extend_from_slice(format!("line {i:07} of the upgrade fixture\n").as_bytes());
        i += 1;
    }
    out.truncate(256 << 10);
    out
}

fn unpack() {
    let root = Path::new(ROOT);
    let _ = std::fs::remove_dir_all(root);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/upgrade-v1.tar.gz");
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(root.parent().expect("a parent"))
        .status()
        .expect("running tar");
    assert!(status.success(), "unpacking {}", fixture.display());
    std::fs::copy(sample("doug.png"), root.join("doug.png")).expect("copying doug.png");
    std::fs::write(root.join("big.bin"), big()).expect("writing big.bin");
}

fn entries(daemon: &Daemon, section: &str) -> Vec<serde_json::Value> {
    daemon.status()[section]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn the_registry_shares_and_a_partial_download_of_the_previous_release_are_kept() {
    unpack();
    let root = Path::new(ROOT);
    let tracker = Tracker::start(&root.join("tracker"), "30s");

    // The paused download: its 2 verified chunks, its output, its state.
    let b = Daemon::start(&root.join("b"), tracker.addr, &[]);
    let downloads = entries(&b, "downloads");
    assert_eq!(downloads.len(), 1, "{downloads:?}");
    let d = &downloads[0];
    assert_eq!(d["name"], "big.bin", "{d}");
    assert_eq!(d["state"]["state"], "paused", "{d}");
    assert_eq!(
        (d["have"].as_u64(), d["chunks"].as_u64()),
        (Some(2), Some(8)),
        "{d}"
    );
    assert_eq!(d["output"], format!("{ROOT}/out/big.bin"), "{d}");

    // The registry: both files listed, doug.png before any daemon announced it again.
    let list = b.ctl(&["list"]).ok();
    assert!(list.contains("There are currently 2 files"), "{list}");
    assert!(list.contains("Name: doug.png Size: 95907 bytes"), "{list}");

    // The shares: both recorded. Unpacked from an archive they are other files (inode,
    // change time), so they wait to be registered again, which needs no other step.
    let a = Daemon::start(&root.join("a"), tracker.addr, &[]);
    let mut names: Vec<String> = entries(&a, "shares")
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    assert_eq!(names, ["big.bin", "doug.png"]);
    for name in ["big.bin", "doug.png"] {
        a.register(&root.join(name));
    }
    assert!(
        entries(&a, "shares").iter().all(|s| s["problem"].is_null()),
        "{}",
        a.status()
    );

    // The download resumes with what it had: only the 6 missing chunks are fetched.
    b.ctl(&["resume", "big.bin"]).ok();
    eventually(Duration::from_secs(60), || {
        (b.download_status()["state"]["state"] == "complete").then_some(())
    })
    .unwrap_or_else(|| panic!("the resumed download never completed: {}", b.status()));
    let out = root.join("out/big.bin");
    assert_eq!(file_sha256(&out), file_sha256(&root.join("big.bin")));
    let fetched = b.download_status()["downloaded"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(
        fetched <= 6 * CHUNK,
        "{fetched} bytes fetched for 6 missing chunks"
    );
    let _ = std::fs::remove_dir_all(root);
}
