//! A finished download keeps being served: the daemon's own writes never make a file it just
//! completed look "changed since it was registered".

use std::time::Duration;

use p2p_tests::{eventually, file_sha256, write_random, Daemon, Swarm};

/// Large enough for hundreds of chunks, a lone-peer download verified on other threads, and
/// an end game with chunks in verification when the last one arrives. (At 256 MiB the code
/// before the fix failed within 1 to 18 rounds, in each of three runs; at 96 MiB it could
/// pass all 20.)
const SIZE: usize = 256 << 20;
const ROUNDS: usize = 20;

/// The entry for `id` in `status --json`'s `section` ("shares" or "downloads").
fn entry(daemon: &Daemon, section: &str, id: &str) -> serde_json::Value {
    let status = daemon.status();
    status[section]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["id"] == id).cloned())
        .unwrap_or_else(|| panic!("no {section} entry for {id}: {status}"))
}

#[test]
fn a_completed_download_is_served_by_its_downloader_round_after_round() {
    // a: the original seeder; b: downloads from a alone; c: then downloads from b alone.
    let swarm = Swarm::new(3, "30s", &[]);
    let (a, b, c) = (&swarm.daemons[0], &swarm.daemons[1], &swarm.daemons[2]);
    for round in 0..ROUNDS {
        let name = format!("round{round}.bin");
        let source = swarm.path(&name);
        write_random(&source, SIZE, 1500 + round as u64);
        let id = a.register(&source);

        let at_b = swarm.path(&format!("b-{name}"));
        b.ctl(&["download", &id, "-o", at_b.to_str().unwrap()]).ok();
        assert_eq!(file_sha256(&at_b), file_sha256(&source), "round {round}");

        // The original seeder goes: whatever c gets, it gets from b.
        a.ctl(&["unregister", &id]).ok();
        let at_c = swarm.path(&format!("c-{name}"));
        c.ctl(&["download", &id, "-o", at_c.to_str().unwrap(), "--detach"])
            .ok();
        // Ends early if b stops serving: c would then wait for ever.
        let done = eventually(Duration::from_secs(60), || {
            let st = entry(c, "downloads", &id);
            let served = entry(b, "shares", &id)["problem"].is_null();
            (!served || st["state"]["state"] == "complete").then_some(())
        });
        let share = entry(b, "shares", &id);
        assert!(
            share["problem"].is_null(),
            "round {round}: the downloader stopped serving its own fresh download: {share}"
        );
        assert!(
            done.is_some(),
            "round {round}: nobody served the file once its seeder left: {}",
            c.status()
        );
        assert_eq!(file_sha256(&at_c), file_sha256(&source), "round {round}");
        eprintln!("round {round}: served by its downloader");
        for path in [&source, &at_b, &at_c] {
            std::fs::remove_file(path).expect("removing a round's file");
        }
    }
}

/// The share's `problem` on `daemon`, once it has one (within 10 s).
fn problem(daemon: &Daemon, id: &str) -> Option<String> {
    eventually(Duration::from_secs(10), || {
        entry(daemon, "shares", id)["problem"]
            .as_str()
            .map(str::to_string)
    })
}

#[test]
fn a_source_replaced_or_a_download_changed_afterwards_is_never_served() {
    let swarm = Swarm::new(3, "30s", &[]);
    let (a, b, c) = (&swarm.daemons[0], &swarm.daemons[1], &swarm.daemons[2]);

    // b downloads a file, then it is rewritten behind b's back: b stops serving it.
    let first = swarm.path("first.bin");
    write_random(&first, 2 << 20, 31);
    let first_id = a.register(&first);
    let at_b = swarm.path("b-first.bin");
    b.ctl(&["download", &first_id, "-o", at_b.to_str().unwrap()])
        .ok();
    assert_eq!(file_sha256(&at_b), file_sha256(&first));
    a.ctl(&["unregister", &first_id]).ok();
    let mut data = std::fs::read(&at_b).expect("reading b's copy");
    data[0] = !data[0];
    std::fs::write(&at_b, &data).expect("rewriting b's copy");
    let at_c = swarm.path("c-first.bin");
    c.ctl(&[
        "download",
        &first_id,
        "-o",
        at_c.to_str().unwrap(),
        "--detach",
    ])
    .ok();
    let why = problem(b, &first_id).expect("b never noticed its download changed");
    assert!(why.contains("changed since it was registered"), "{why}");

    // a's registered file is replaced the way rsync or `cp -p` and `mv` do it: another file,
    // same size, same modification time, renamed over it. a stops serving it.
    let second = swarm.path("second.bin");
    write_random(&second, 2 << 20, 32);
    let second_id = a.register(&second);
    let mtime = std::fs::metadata(&second)
        .and_then(|m| m.modified())
        .expect("stat");
    let other = swarm.path("other.bin");
    write_random(&other, 2 << 20, 33);
    std::fs::File::options()
        .write(true)
        .open(&other)
        .and_then(|f| f.set_modified(mtime))
        .expect("setting the time");
    std::fs::rename(&other, &second).expect("replacing the file");
    let at_c2 = swarm.path("c-second.bin");
    c.ctl(&[
        "download",
        &second_id,
        "-o",
        at_c2.to_str().unwrap(),
        "--detach",
    ])
    .ok();
    let why = problem(a, &second_id).expect("a never noticed its file was replaced");
    assert!(why.contains("another file took its place"), "{why}");
    assert!(
        !at_c.exists() && !at_c2.exists(),
        "nothing stale was assembled"
    );
}
