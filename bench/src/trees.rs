//! Directories shared as collections, as the directory issue measures them: many small files
//! against one file of the same size (and aria2c with the same tree as a multi-file
//! torrent), a large set's leecher memory against one file's, and a restart with thousands of
//! files shared.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::lab::Net;
use crate::measure::poll;
use crate::others::{bittorrent, size_of};
use crate::{ours, scratch, settle, MIB};

/// The summary lines of every directory scenario.
pub fn trees(base: &Path, files: &Path, quick: bool, run_others: bool) -> Vec<String> {
    let mut lines = small_files(base, files, quick, run_others);
    lines.push(large_set(base, files, quick));
    lines.push(restart(base, files, quick));
    lines
}

/// A tree of `n` files of `size(i)` bytes, 100 to a directory.
fn make_tree(root: &Path, n: usize, size: impl Fn(usize) -> usize) {
    for i in 0..n {
        let dir = root.join(format!("d{:03}", i / 100));
        std::fs::create_dir_all(&dir).expect("bench tree directory");
        p2p_tests::write_random(&dir.join(format!("f{i:05}.bin")), size(i), i as u64);
    }
}

/// Seconds and bytes per second of a registration.
fn rate(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// 10,000 files of 1 KiB to 256 KiB (2,000 with `--quick`) from 3 seeders on loopback,
/// against one file of the same size, then aria2c with the tree as a multi-file torrent.
fn small_files(base: &Path, files: &Path, quick: bool, run_others: bool) -> Vec<String> {
    let n = if quick { 2_000 } else { 10_000 };
    let tree = files.join(format!("small-{n}"));
    // Spread evenly over 1 KiB..256 KiB by a fixed stride: the same tree every run.
    make_tree(&tree, n, |i| 1024 + (i * 7_919) % (255 * 1024));
    let total = size_of(&tree);
    let one = files.join(format!("small-{n}-as-one.bin"));
    p2p_tests::write_random(&one, total as usize, 77);
    settle(&one);
    let net = Net::loopback(4);
    eprint!("many small files, ours, {n} files ");
    let (as_tree, reg_tree) = ours::download(&net, 3, &scratch(base, "tree-small"), &tree, 1, &[]);
    eprint!(" one file of the same size ");
    let (as_one, reg_one) = ours::download(&net, 3, &scratch(base, "tree-one"), &one, 1, &[]);
    eprintln!();
    let mut lines = vec![format!(
        "many small files ({n} files of 1 to 256 KiB, {} MiB), loopback, 3 seeders: ours {:.2} s, one file of the same size {:.2} s: {:.2}x (target 1.5x); registering {:.0} MB/s vs {:.0} MB/s",
        total / MIB,
        as_tree.seconds,
        as_one.seconds,
        as_tree.seconds / as_one.seconds,
        rate(total, reg_tree),
        rate(total, reg_one),
    )];
    if run_others {
        eprint!("many small files, aria2c BitTorrent (multi-file torrent) ");
        let line = match bittorrent(&net, 3, &scratch(base, "tree-bt"), &tree, 1) {
            Ok(bt) => format!(
                "many small files, aria2c BitTorrent with the same tree as a multi-file torrent, 3 seeders: {:.2} s (ours {:.2} s)",
                bt.seconds, as_tree.seconds
            ),
            Err(e) => format!("many small files, aria2c BitTorrent failed: {e}"),
        };
        eprintln!();
        lines.push(line);
    }
    lines
}

/// 64 files totalling 8 GiB (1 GiB with `--quick`) from one seeder: the leecher's peak RSS
/// against one file of the same size, and registration's rate.
fn large_set(base: &Path, files: &Path, quick: bool) -> String {
    let each = if quick { 16 * MIB } else { 128 * MIB };
    let tree = files.join("large-set");
    make_tree(&tree, 64, |_| each as usize);
    let total = size_of(&tree);
    let one = files.join("large-set-as-one.bin");
    p2p_tests::write_random(&one, total as usize, 64);
    settle(&one);
    let net = Net::loopback(2);
    eprint!("large set, ours, 64 files ");
    let (as_tree, reg_tree) = ours::download(&net, 1, &scratch(base, "tree-large"), &tree, 1, &[]);
    eprint!(" one file ");
    let (as_one, reg_one) = ours::download(&net, 1, &scratch(base, "tree-large-one"), &one, 1, &[]);
    eprintln!();
    let _ = std::fs::remove_dir_all(&tree);
    let _ = std::fs::remove_file(&one);
    format!(
        "large set (64 files, {} MiB), loopback, 1 seeder: leecher peak RSS {:.0} MiB vs {:.0} MiB for one file ({:+.0} %, target within 10 %); {:.2} s vs {:.2} s; registering {:.0} MB/s vs {:.0} MB/s",
        total / MIB,
        as_tree.leecher_rss,
        as_one.leecher_rss,
        (as_tree.leecher_rss / as_one.leecher_rss - 1.0) * 100.0,
        as_tree.seconds,
        as_one.seconds,
        rate(total, reg_tree),
        rate(total, reg_one),
    )
}

/// A daemon sharing 20,000 files (2,000 with `--quick`) stops cleanly and starts again:
/// seconds until it is ready, and until it has announced itself to the tracker again.
fn restart(base: &Path, files: &Path, quick: bool) -> String {
    let n = if quick { 2_000 } else { 20_000 };
    let tree = files.join(format!("restart-{n}"));
    make_tree(&tree, n, |_| 1024);
    let net = Net::loopback(1);
    let dir = scratch(base, "tree-restart");
    let tracker = ours::start_tracker(&net, &dir);
    let mut d = ours::start_daemon(&net, 0, &dir.join("seed"), &tracker, &[]);
    d.ctl_json(&["register", &tree.to_string_lossy()]);
    d.ctl(&["quit"]);
    d.proc.wait_exit(Duration::from_secs(60));
    let start = Instant::now();
    d.restart();
    let ready = start.elapsed().as_secs_f64();
    let connected = poll(Duration::from_secs(60), || {
        d.status()["tracker_connected"] == true
    });
    let serving = start.elapsed().as_secs_f64();
    format!(
        "restart sharing {n} files (none re-hashed: each is checked by a stat when first served): ready in {ready:.2} s, announced again in {serving:.2} s (target 2 s){}",
        if connected { "" } else { " (never reconnected in 60 s)" }
    )
}
