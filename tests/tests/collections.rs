//! Sharing a directory as one collection: registered, listed, downloaded bit-identical with
//! its modes, served on by its downloader, refused when hostile, deduplicated against what
//! a daemon holds, resumed after a kill.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use p2p_schema::{Collection, Entry, ManifestBuilder};
use p2p_tests::fake::{self, Behaviour};
use p2p_tests::{eventually, file_sha256, write_random, Daemon, Swarm};

/// What a tree holds, as `diff -r` and `ls -l` would compare it: every directory and file by
/// relative path, files with their SHA-256 and whether the owner may execute them; symbolic
/// links by their target.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("listing a tree") {
            let path = entry.expect("an entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("under the root")
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).expect("an entry's metadata");
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("a link's target");
                out.insert(rel, format!("link -> {}", target.display()));
            } else if meta.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &path, out);
            } else {
                let exec = meta.permissions().mode() & 0o100 != 0;
                out.insert(rel, format!("file {} exec={exec}", file_sha256(&path)));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A tree with what trips tools up: nested and empty directories, empty files, Unicode and
/// spaces in names, an executable, a hidden file, two files with the same bytes, names ending
/// like temporary files (`.part`, `.copy`, `.unpack`), and
/// symbolic links (to a file outside, and to a directory inside) that must be skipped.
fn make_tree(root: &Path, outside: &Path) {
    let dir = |p: &str| std::fs::create_dir_all(root.join(p)).expect("mkdir");
    dir("weights");
    dir("empty-dir");
    dir("nested/deeper/also empty");
    dir("ünïcode dir");
    dir("sub");
    write_random(&root.join("weights/shard-0.bin"), 3 << 20, 1);
    write_random(&root.join("weights/shard-1.bin"), (1 << 20) + 17, 2);
    std::fs::write(root.join("config.json"), b"{\"layers\": 12}\n").expect("write");
    std::fs::write(root.join("empty.txt"), b"").expect("write");
    std::fs::write(root.join("ünïcode dir/名前 with space.txt"), "こんにちは\n").expect("write");
    std::fs::write(root.join(".hidden"), b"dot file\n").expect("write");
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").expect("write");
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    // Names a daemon might use for its own temporary files beside them.
    std::fs::write(
        root.join("weights/shard-1.bin.part"),
        b"not a partial file\n",
    )
    .expect("write");
    std::fs::write(root.join("config.json.copy"), b"a copy\n").expect("write");
    std::fs::write(root.join("run.sh.unpack"), b"x\n").expect("write");
    write_random(&root.join("dup-a.bin"), 200_000, 3);
    write_random(&root.join("sub/dup-b.bin"), 200_000, 3);
    std::fs::write(outside, b"secret outside the tree\n").expect("write");
    std::os::unix::fs::symlink(outside, root.join("link-out")).expect("symlink");
    std::os::unix::fs::symlink("weights", root.join("weights-link")).expect("symlink");
}

/// The snapshot of a tree without its symbolic links (what a collection carries).
fn without_links(mut tree: BTreeMap<String, String>) -> BTreeMap<String, String> {
    tree.retain(|_, v| !v.starts_with("link"));
    tree
}

/// The entry for `id` in `status --json`'s collections.
fn collection(daemon: &Daemon, id: &str) -> serde_json::Value {
    let status = daemon.status();
    status["collections"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["id"] == id).cloned())
        .unwrap_or_else(|| panic!("no collection {id}: {status}"))
}

/// Bytes received from peers, over all files (from the daemon's metrics).
fn received(daemon: &Daemon) -> f64 {
    daemon
        .metrics()
        .samples
        .iter()
        .filter(|(k, _)| k.starts_with("p2pd_received_bytes"))
        .map(|(_, v)| v)
        .sum()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn a_directory_is_shared_as_one_collection_and_recreated_bit_identical_with_its_modes() {
    let swarm = Swarm::new(3, "30s", &[]);
    let (a, b, c) = (&swarm.daemons[0], &swarm.daemons[1], &swarm.daemons[2]);
    let root = swarm.path("model");
    make_tree(&root, &swarm.path("outside.txt"));

    let text = a.ctl(&["register", s(&root)]).ok();
    assert!(
        text.starts_with("Registration of model/ (12 files, 4.38 MiB) successful.\nID: "),
        "{text}"
    );
    assert!(text.contains("Skipped 2 entries"), "{text}");
    assert!(
        !text.contains("link-out"),
        "without -v the skipped are not listed: {text}"
    );
    // Registering it again is the same collection; -v lists what was skipped.
    let verbose = a.ctl(&["-v", "register", s(&root)]).ok();
    assert!(verbose.contains("link-out (symbolic link)"), "{verbose}");
    assert!(
        verbose.contains("weights-link (symbolic link)"),
        "{verbose}"
    );
    let doc = a.ctl_json(&["register", s(&root)]);
    let id = doc["file"]["id"].as_str().expect("an ID").to_string();
    assert_eq!(doc["file"]["collection"], true, "{doc}");
    assert_eq!(doc["collection"]["files"], 12, "{doc}");
    assert_eq!(
        doc["collection"]["skipped"].as_array().map(Vec::len),
        Some(2),
        "{doc}"
    );

    let list = b.ctl(&["list"]).ok();
    assert!(list.contains("Name: model/ (a directory)"), "{list}");
    let shared = collection(a, &id);
    assert_eq!(shared["state"]["state"], "complete", "{shared}");
    assert_eq!(shared["files"], 12, "{shared}");
    // Its files are the collection's, not shares of their own.
    assert_eq!(a.status()["shares"].as_array().map(Vec::len), Some(0));

    let out = swarm.path("out-b");
    std::fs::create_dir(&out).expect("mkdir");
    let done = b.ctl(&["download", "model", "-o", s(&out)]).ok();
    assert!(done.contains("model/ has completed downloading."), "{done}");
    let expected = without_links(snapshot(&root));
    assert_eq!(snapshot(&out.join("model")), expected);
    assert!(
        !out.join("model.part").exists(),
        "the temporary tree is gone"
    );
    let got = collection(b, &id);
    assert_eq!(got["state"]["state"], "complete", "{got}");
    assert_eq!(
        (got["files_done"].clone(), got["files"].clone()),
        (12.into(), 12.into())
    );
    assert_eq!(b.status()["downloads"].as_array().map(Vec::len), Some(0));

    // The seeder goes: c gets the whole tree from b, which serves it from where it now lies.
    a.ctl(&["unregister", &id]).ok();
    assert!(a.status()["collections"]
        .as_array()
        .is_some_and(Vec::is_empty));
    let out_c = swarm.path("out-c");
    std::fs::create_dir(&out_c).expect("mkdir");
    c.ctl(&["download", &id, "-o", s(&out_c)]).ok();
    assert_eq!(snapshot(&out_c.join("model")), expected);

    // A second download to the same place is refused, and nothing there is touched.
    let again = c.ctl(&["download", &id, "-o", s(&out_c)]).fails();
    assert!(again.contains("already has model/"), "{again}");
    assert_eq!(snapshot(&out_c.join("model")), expected);
}

/// A fake peer serving `collection`'s index (listed as `name`) honestly: its contents are
/// the attack.
fn hostile(swarm: &Swarm, name: &str, entries: Vec<Entry>) -> fake::FakePeer {
    let bytes = Collection {
        entries,
        pack: None,
    }
    .encode();
    let mut builder = ManifestBuilder::new(1024);
    builder.update(&bytes);
    let mut manifest = builder.finish(name.to_string());
    manifest.collection = true;
    fake::start_with(swarm.tracker.addr, manifest, bytes, Behaviour::Honest)
}

fn file(path: &str) -> Entry {
    let data = b"pwned\n";
    let mut b = ManifestBuilder::new(1024);
    b.update(data);
    let m = b.finish("x".into());
    Entry::File {
        path: path.into(),
        executable: true,
        size: m.size,
        chunk_size: m.chunk_size,
        hashes: m.hashes,
    }
}

#[test]
fn a_hostile_collection_is_refused_before_anything_is_written() {
    let swarm = Swarm::new(1, "30s", &[]);
    let d = &swarm.daemons[0];
    let out = swarm.path("out");
    std::fs::create_dir(&out).expect("mkdir");
    let cases: [(&str, Vec<Entry>, &str); 5] = [
        ("dotdot", vec![file("../x")], "relative path component"),
        ("absolute", vec![file("/tmp/x")], "absolute path"),
        ("twice", vec![file("a"), file("a")], "twice"),
        (
            "file-and-dir",
            vec![file("a"), file("a/b")],
            "also the directory",
        ),
        (
            "folding",
            vec![file("README"), file("readme")],
            "case-insensitive",
        ),
    ];
    for (name, entries, why) in cases {
        let _peer = hostile(&swarm, name, entries);
        let e = d.ctl(&["download", name, "-o", s(&out)]).fails();
        assert!(e.contains("refused") && e.contains(why), "{name}: {e}");
        assert_eq!(
            std::fs::read_dir(&out).expect("listing").count(),
            0,
            "{name}: something was written"
        );
    }
    assert!(
        !swarm.path("x").exists(),
        "a path escaped the output directory"
    );
}

#[test]
fn a_file_held_here_already_is_copied_not_fetched() {
    let swarm = Swarm::new(2, "30s", &["--metrics", "127.0.0.1:0"]);
    let (a, b) = (&swarm.daemons[0], &swarm.daemons[1]);
    let root = swarm.path("data");
    std::fs::create_dir_all(root.join("big")).expect("mkdir");
    write_random(&root.join("big/held.bin"), 8 << 20, 10);
    write_random(&root.join("small.bin"), 1 << 20, 11);
    a.register(&root);
    // b holds held.bin already, registered alone, from elsewhere on its disk.
    let elsewhere = swarm.path("b-copy.bin");
    std::fs::copy(root.join("big/held.bin"), &elsewhere).expect("copy");
    b.register(&elsewhere);

    let before = received(b);
    let out = swarm.path("out");
    std::fs::create_dir(&out).expect("mkdir");
    b.ctl(&["download", "data", "-o", s(&out)]).ok();
    assert_eq!(snapshot(&out.join("data")), snapshot(&root));
    let fetched = received(b) - before;
    // The index and small.bin, not the 8 MiB held already.
    assert!(
        fetched < f64::from(2 << 20),
        "{fetched} bytes fetched: the file held already was fetched again"
    );
    assert!(
        fetched >= f64::from(1 << 20),
        "{fetched}: small.bin must be fetched"
    );
}

#[test]
fn a_large_file_held_only_inside_a_collection_is_served_to_whoever_fetches_it_alone() {
    let swarm = Swarm::new(3, "30s", &["--metrics", "127.0.0.1:0"]);
    let (a, b, c) = (&swarm.daemons[0], &swarm.daemons[1], &swarm.daemons[2]);
    let root = swarm.path("model");
    std::fs::create_dir_all(&root).expect("mkdir");
    write_random(&root.join("shard-1.bin"), 9 << 20, 40);
    write_random(&root.join("config.json"), 2_000, 41);
    a.register(&root);
    // The tree is listed, not its files.
    let list = c.ctl(&["list"]).ok();
    assert!(
        list.contains("model/") && !list.contains("shard-1.bin"),
        "{list}"
    );
    // b held the shard alone once (that is how its ID is known), and holds it no longer.
    let once = swarm.path("b-shard.bin");
    std::fs::copy(root.join("shard-1.bin"), &once).expect("copy");
    let id = b.register(&once);
    b.ctl(&["unregister", &id]).ok();
    let holders = |d: &Daemon| d.ctl_json(&["locate", &id])["holders"].as_array().map(Vec::len);
    assert_eq!(holders(c), Some(1), "a, the tree's holder, is found");

    let before = received(c);
    let out = swarm.path("out");
    std::fs::create_dir(&out).expect("mkdir");
    c.ctl(&["download", &id, "-o", s(&out)]).ok();
    let got = std::fs::read_dir(&out)
        .expect("output directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_file())
        .expect("the downloaded file");
    assert_eq!(file_sha256(&got), file_sha256(&root.join("shard-1.bin")));
    let fetched = received(c) - before;
    assert!(fetched >= f64::from(9 << 20), "{fetched} bytes received");

    // a stops sharing the tree: the tracker hears a holds the shard no longer either.
    a.ctl(&["unregister", "model"]).ok();
    eventually(Duration::from_secs(10), || (holders(b) == Some(1)).then_some(()))
        .unwrap_or_else(|| panic!("a still holds the shard: {:?}", holders(b)));
}

/// A seeder whose uplink is capped at `rate` bytes/s, and a second daemon, both with metrics.
fn seeder_capped_at(rate: &str) -> Swarm {
    let mut swarm = Swarm::new(
        1,
        "30s",
        &["--upload-rate", rate, "--metrics", "127.0.0.1:0"],
    );
    swarm.add_daemon(&["--metrics", "127.0.0.1:0"]);
    swarm
}

#[test]
fn a_collection_download_killed_midway_resumes_file_by_file_without_refetching() {
    // A capped seeder, so the download is caught in the middle.
    let mut swarm = seeder_capped_at("8000000");
    let root = swarm.path("set");
    std::fs::create_dir_all(root.join("parts")).expect("mkdir");
    for i in 0..8 {
        write_random(&root.join(format!("parts/p{i}.bin")), 6 << 20, 100 + i);
    }
    let total = 48u64 << 20;
    let id = swarm.daemons[0].register(&root);
    let out = swarm.path("out");
    std::fs::create_dir(&out).expect("mkdir");
    let b = &mut swarm.daemons[1];
    b.ctl(&["download", &id, "-o", s(&out), "--detach"]).ok();
    let done_before = eventually(Duration::from_secs(60), || {
        let c = collection(b, &id);
        let done = c["bytes_done"].as_u64()?;
        (done >= total / 4).then_some(done)
    })
    .unwrap_or_else(|| panic!("never reached a quarter: {}", b.status()));
    let got_before = received(b);
    b.proc.kill();
    b.restart();
    let mut tree: PathBuf = out.join("set");
    eventually(Duration::from_secs(120), || {
        (collection(b, &id)["state"]["state"] == "complete").then_some(())
    })
    .unwrap_or_else(|| panic!("never completed after the restart: {}", b.status()));
    assert_eq!(snapshot(&tree), snapshot(&root));
    let got_after = received(b);
    // Bytes verified before the kill are not fetched again: what the second run fetched is
    // what was missing, give or take the chunks in flight at the kill.
    let missing = (total - done_before) as f64;
    eprintln!(
        "killed at {done_before} of {total} bytes; fetched {got_before} before, {got_after} after"
    );
    assert!(
        got_after <= missing + f64::from(4 << 20),
        "after the restart {got_after} bytes were fetched, {missing} were missing (first run fetched {got_before})"
    );
    tree.pop();
    assert!(!tree.join("set.part").exists());
}

#[test]
fn a_daemon_killed_while_cutting_small_files_from_the_pack_resumes_and_recuts_a_torn_one() {
    // A capped seeder, so the pack is caught arriving, with some files already cut out.
    let mut swarm = seeder_capped_at("4000000");
    let root = swarm.path("set");
    std::fs::create_dir_all(root.join("small")).expect("mkdir");
    let mut total = 0u64;
    for i in 0..300u64 {
        let size = 4096 + (i * 7919) % (60 << 10);
        write_random(
            &root.join(format!("small/f{i:03}.bin")),
            size as usize,
            500 + i,
        );
        total += size;
    }
    let id = swarm.daemons[0].register(&root);
    let out = swarm.path("out");
    std::fs::create_dir(&out).expect("mkdir");
    let part = out.join("set.part");
    let b = &mut swarm.daemons[1];
    b.ctl(&["download", &id, "-o", s(&out), "--detach"]).ok();
    // A third of the pack in (its download's record is on disk by then: sled flushes every
    // 500 ms), and a file cut out already, at its place in the tree being built.
    let (done_before, cut) = eventually(Duration::from_secs(60), || {
        let done = collection(b, &id)["bytes_done"].as_u64()?;
        let cut = (0..300).map(|i| format!("small/f{i:03}.bin")).find(|f| {
            std::fs::read(part.join(f)).is_ok_and(|got| {
                !got.is_empty() && std::fs::read(root.join(f)).is_ok_and(|want| got == want)
            })
        })?;
        (done >= total / 3).then_some((done, cut))
    })
    .unwrap_or_else(|| panic!("never a third in with a file cut out: {}", b.status()));
    b.proc.kill();
    assert!(
        part.is_dir() && !out.join("set").exists() && done_before < total,
        "the tree was complete before the kill ({done_before} of {total} bytes)"
    );
    // Torn by the crash: its record never reached the disk, so it must be cut again.
    let torn = part.join(&cut);
    let len = std::fs::metadata(&torn).expect("the cut file").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&torn)
        .and_then(|f| f.set_len(len / 2))
        .expect("tearing the cut file");
    b.restart();
    eventually(Duration::from_secs(120), || {
        (collection(b, &id)["state"]["state"] == "complete").then_some(())
    })
    .unwrap_or_else(|| panic!("never completed after the restart: {}", b.status()));
    assert_eq!(snapshot(&out.join("set")), snapshot(&root));
    assert!(!part.exists());
    // The pack's chunks verified before the kill are not fetched again.
    let got_after = received(b);
    let missing = (total - done_before) as f64;
    eprintln!("killed at {done_before} of {total} bytes ({cut} cut); fetched {got_after} after");
    assert!(
        got_after <= missing + f64::from(2 << 20),
        "after the restart {got_after} bytes were fetched, {missing} were missing"
    );
}

/// Descriptors process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fd: {e}"))
}

#[test]
fn two_thousand_files_are_shared_and_fetched_under_ulimit_n_256() {
    const FILES: u64 = 2000;
    let limited = ["sh", "-c", "ulimit -n 256 && exec \"$@\"", "sh"];
    let mut swarm = Swarm::new(0, "30s", &[]);
    for name in ["seeder", "leecher"] {
        let data = swarm.path(name);
        let d = Daemon::start_in(&limited, "127.0.0.1:0", &data, swarm.tracker.addr, &[]);
        swarm.daemons.push(d);
    }
    let (a, b) = (&swarm.daemons[0], &swarm.daemons[1]);
    let limit =
        std::fs::read_to_string(format!("/proc/{}/limits", a.proc.pid())).expect("reading limits");
    assert!(
        limit
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 256 ")),
        "the daemon does not run under ulimit -n 256: {limit}"
    );
    let root = swarm.path("many");
    for i in 0..FILES {
        let dir = root.join(format!("d{}", i % 40));
        std::fs::create_dir_all(&dir).expect("mkdir");
        write_random(
            &dir.join(format!("f{i}.bin")),
            1024 + (i as usize * 37) % 8192,
            i,
        );
    }
    let out = a.ctl(&["register", s(&root)]).ok();
    assert!(out.contains(&format!("({FILES} files,")), "{out}");
    let dest = swarm.path("out");
    std::fs::create_dir(&dest).expect("mkdir");
    b.ctl(&["download", "many", "-o", s(&dest)]).ok();
    assert_eq!(snapshot(&dest.join("many")), snapshot(&root));
    for d in [a, b] {
        let n = open_fds(d.proc.pid());
        assert!(n < 128, "{n} descriptors open in {}", d.data_dir.display());
    }
}

#[test]
fn pause_resume_cancel_and_unregister_act_on_the_whole_tree() {
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "4000000"]);
    swarm.add_daemon(&[]);
    let (a, b) = (&swarm.daemons[0], &swarm.daemons[1]);
    let root = swarm.path("tree");
    std::fs::create_dir_all(root.join("x")).expect("mkdir");
    for i in 0..6 {
        write_random(&root.join(format!("x/f{i}.bin")), 4 << 20, 200 + i);
    }
    let id = a.register(&root);
    let out = swarm.path("out");
    std::fs::create_dir(&out).expect("mkdir");
    b.ctl(&["download", "tree", "-o", s(&out), "--detach"]).ok();
    eventually(Duration::from_secs(30), || {
        (collection(b, &id)["bytes_done"].as_u64()? > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("nothing arrived: {}", b.status()));

    b.ctl(&["pause", "tree"]).ok();
    let paused = collection(b, &id);
    assert_eq!(paused["state"]["state"], "paused", "{paused}");
    // Paused means paused: nothing more arrives.
    std::thread::sleep(Duration::from_millis(800));
    let still = collection(b, &id);
    assert_eq!(still["bytes_done"], paused["bytes_done"], "{still}");
    assert!(out.join("tree.part").is_dir() && !out.join("tree").exists());

    b.ctl(&["resume", &id[..12]]).ok();
    eventually(Duration::from_secs(60), || {
        (collection(b, &id)["state"]["state"] == "complete").then_some(())
    })
    .unwrap_or_else(|| panic!("never completed after resume: {}", b.status()));
    assert_eq!(snapshot(&out.join("tree")), snapshot(&root));
    let e = b.ctl(&["cancel", "tree"]).fails();
    assert!(e.contains("complete; use 'p2pctl unregister'"), "{e}");
    b.ctl(&["unregister", "tree"]).ok();
    assert!(b.status()["collections"]
        .as_array()
        .is_some_and(Vec::is_empty));
    assert_eq!(
        snapshot(&out.join("tree")),
        snapshot(&root),
        "unregister keeps the files"
    );

    // A cancelled collection download leaves nothing behind.
    let out2 = swarm.path("out2");
    std::fs::create_dir(&out2).expect("mkdir");
    b.ctl(&["download", "tree", "-o", s(&out2), "--detach"])
        .ok();
    eventually(Duration::from_secs(30), || {
        (collection(b, &id)["bytes_done"].as_u64()? > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("nothing arrived: {}", b.status()));
    b.ctl(&["cancel", "tree"]).ok();
    assert_eq!(std::fs::read_dir(&out2).expect("listing").count(), 0);
    let status = b.status();
    assert!(
        status["collections"].as_array().is_some_and(Vec::is_empty),
        "{status}"
    );
    assert!(
        status["downloads"].as_array().is_some_and(Vec::is_empty),
        "{status}"
    );
}

/// Waits until `daemon`'s `list` shows `name` (a restarted holder announced it again).
fn wait_listed(daemon: &Daemon, name: &str, what: &str) {
    eventually(Duration::from_secs(30), || {
        daemon.ctl(&["list"]).ok().contains(name).then_some(())
    })
    .unwrap_or_else(|| panic!("never listed: {what}"));
}

/// Files under `dir` whose name ends in `.pack`.
fn packs_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "pack") {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn small_files_are_served_from_where_they_lie_with_no_copy_kept_and_after_restarts() {
    let mut swarm = Swarm::new(3, "30s", &[]);
    let root = swarm.path("many");
    for i in 0..40 {
        let dir = root.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&dir).expect("mkdir");
        write_random(&dir.join(format!("f{i}")), 1_000 + i * 997, i as u64);
    }
    write_random(&root.join("large.bin"), 2 << 20, 99);
    let expected = snapshot(&root);
    let id = {
        let a = &swarm.daemons[0];
        a.ctl_json(&["register", s(&root)])["file"]["id"]
            .as_str()
            .expect("an ID")
            .to_string()
    };
    assert_eq!(
        packs_under(&swarm.daemons[0].data_dir),
        Vec::<PathBuf>::new(),
        "registering keeps no copy of the small files"
    );

    // The registrant restarted serves the tree (its pack read from the files) to b.
    swarm.daemons[0].ctl(&["quit"]).ok();
    swarm.daemons[0].proc.kill();
    swarm.daemons[0].restart();
    let b = &swarm.daemons[1];
    let out_b = fetch_listed(&swarm, b, &id, "out-b", "the restarted registrant");
    assert_eq!(snapshot(&out_b.join("many")), expected);
    // Removed in the background once the tree is in place.
    let gone = eventually(Duration::from_secs(10), || {
        packs_under(&b.data_dir).is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "the pack fetched to build the tree is gone once the tree is in place: {:?}",
        packs_under(&b.data_dir)
    );

    // The registrant goes; b, restarted, serves the tree from where it put it.
    swarm.daemons[0].ctl(&["unregister", &id]).ok();
    swarm.daemons[1].proc.kill();
    swarm.daemons[1].restart();
    let c = &swarm.daemons[2];
    let out_c = fetch_listed(&swarm, c, &id, "out-c", "the restarted downloader");
    assert_eq!(snapshot(&out_c.join("many")), expected);
}

/// Once `many/` is listed again (announced by `by`, restarted), `daemon` downloads tree `id`
/// into a new directory `out` of the swarm's; that directory.
fn fetch_listed(swarm: &Swarm, daemon: &Daemon, id: &str, out: &str, by: &str) -> PathBuf {
    let out = swarm.path(out);
    std::fs::create_dir(&out).expect("mkdir");
    wait_listed(daemon, "many/", &format!("{by} announced the tree again"));
    daemon.ctl(&["download", id, "-o", s(&out)]).ok();
    out
}

#[test]
fn a_pack_whose_file_changed_is_no_longer_served_and_nothing_wrong_is_placed() {
    let swarm = Swarm::new(2, "30s", &[]);
    let (a, b) = (&swarm.daemons[0], &swarm.daemons[1]);
    let root = swarm.path("tree");
    std::fs::create_dir_all(&root).expect("mkdir");
    for i in 0..8u64 {
        write_random(&root.join(format!("f{i}")), 20_000, i);
    }
    let id = a.ctl_json(&["register", s(&root)])["file"]["id"]
        .as_str()
        .expect("an ID")
        .to_string();
    // Changed behind the daemon's back: same size, other bytes, a later modification time.
    std::thread::sleep(Duration::from_millis(20));
    write_random(&root.join("f3"), 20_000, 99);
    let out = swarm.path("out");
    std::fs::create_dir(&out).expect("mkdir");
    b.ctl(&["download", &id, "-o", s(&out), "--detach"]).ok();
    a.proc
        .wait_for("no longer serving the pack", Duration::from_secs(30));
    // The only holder no longer serves it: the tree is not placed, with or without f3.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !out.join("tree").exists(),
        "a tree was placed from a changed pack"
    );
    assert_ne!(collection(b, &id)["state"]["state"], "complete");
}
