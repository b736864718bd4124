//! A download reported complete is exactly the bytes its ID names, whatever runs beside it:
//! two downloads never share a partial file or an output, one file has one download task,
//! and a download finished just before a crash is recognised, not fetched again.

use std::time::Duration;

use p2p_tests::{file_sha256, write_random, Daemon, Swarm};

/// The download of `id` in `status --json`.
fn download(daemon: &Daemon, id: &str) -> serde_json::Value {
    let status = daemon.status();
    status["downloads"]
        .as_array()
        .and_then(|all| all.iter().find(|d| d["id"] == id))
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn two_files_of_one_name_downloaded_at_once_into_one_directory_never_mix() {
    // A capped seeder: the first download is still running when the second is asked for.
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "8000000"]);
    swarm.add_daemon(&[]);
    let (seeder, leecher) = (&swarm.daemons[0], &swarm.daemons[1]);
    let (one, two) = (swarm.path("one"), swarm.path("two"));
    std::fs::create_dir_all(&one).expect("mkdir");
    std::fs::create_dir_all(&two).expect("mkdir");
    let (first, second) = (one.join("x.bin"), two.join("x.bin"));
    write_random(&first, 16 << 20, 41);
    write_random(&second, 16 << 20, 42);
    let first_id = seeder.register(&first);
    let second_id = seeder.register(&second);
    let out = swarm.path("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    let dir = format!("{}/", out.display());

    leecher
        .ctl(&["download", &first_id, "-o", &dir, "--detach"])
        .ok();
    let refused = leecher
        .ctl(&["download", &second_id, "-o", &dir, "--detach"])
        .fails();
    assert!(
        refused.contains("x.bin.part already exists"),
        "the second download was not told its output is taken: {refused}"
    );
    leecher.wait_complete(Duration::from_secs(60));
    assert_eq!(
        file_sha256(&out.join("x.bin")),
        file_sha256(&first),
        "the completed file is not the bytes its ID names"
    );
    assert_eq!(
        leecher.status()["downloads"].as_array().map(Vec::len),
        Some(1),
        "the refused download left a record"
    );
    // Once the first is done, the name is taken by a finished file: still refused, clearly.
    let refused = leecher
        .ctl(&["download", &second_id, "-o", &dir, "--detach"])
        .fails();
    assert!(refused.contains("already exists"), "{refused}");
    assert_eq!(file_sha256(&out.join("x.bin")), file_sha256(&first));
}

#[test]
fn concurrent_download_commands_for_one_file_start_one_task() {
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "8000000"]);
    swarm.add_daemon(&[]);
    let file = swarm.path("f.bin");
    write_random(&file, 16 << 20, 43);
    let id = swarm.daemons[0].register(&file);
    let out = swarm.path("f-copy.bin");
    let leecher = &swarm.daemons[1];
    let out_arg = out.to_str().expect("UTF-8 path");
    std::thread::scope(|s| {
        let commands: Vec<_> = (0..6)
            .map(|_| s.spawn(|| leecher.ctl(&["download", &id, "-o", out_arg, "--detach"])))
            .collect();
        for c in commands {
            c.join().expect("a p2pctl thread").ok();
        }
    });
    leecher.wait_complete(Duration::from_secs(60));
    assert_eq!(file_sha256(&out), file_sha256(&file));
    assert_eq!(
        leecher.proc.count("download started"),
        1,
        "one file, more than one download task:\n{}",
        leecher.proc.log()
    );
}

#[test]
fn pause_and_resume_in_quick_succession_never_run_two_tasks() {
    // Slow enough (4 s) that the ten pauses all land before the download completes.
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "8000000"]);
    swarm.add_daemon(&[]);
    let file = swarm.path("p.bin");
    write_random(&file, 32 << 20, 44);
    let id = swarm.daemons[0].register(&file);
    let out = swarm.path("p-copy.bin");
    let leecher = &swarm.daemons[1];
    leecher
        .ctl(&["download", &id, "-o", out.to_str().unwrap(), "--detach"])
        .ok();
    leecher.wait_have(16);
    for _ in 0..10 {
        leecher.ctl(&["pause", &id]).ok();
        leecher.ctl(&["resume", &id]).ok();
    }
    leecher.wait_complete(Duration::from_secs(60));
    assert_eq!(file_sha256(&out), file_sha256(&file));
    // Each pause ended its task before the resume started the next: never two at once.
    let log = leecher.proc.log();
    let (started, stopped) = (
        log.matches("download started").count(),
        log.matches("download stopped").count(),
    );
    assert_eq!((started, stopped), (11, 10), "{log}");
    assert!(!log.contains("download failed"), "{log}");
    assert_eq!(download(leecher, &id)["state"]["state"], "complete");
}

#[test]
fn a_download_renamed_into_place_just_before_a_crash_is_recognised_not_refetched() {
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "8000000"]);
    swarm.add_daemon(&[]);
    let file = swarm.path("r.bin");
    write_random(&file, 16 << 20, 45);
    let id = swarm.daemons[0].register(&file);
    let out = swarm.path("r-copy.bin");
    let part = swarm.path("r-copy.bin.part");
    let leecher = &mut swarm.daemons[1];
    leecher
        .ctl(&["download", &id, "-o", out.to_str().unwrap(), "--detach"])
        .ok();
    leecher.wait_have(4);
    leecher.proc.kill();
    // What a crash between the final rename and recording it complete leaves: the output in
    // place, whole, no partial file, and sled still saying `running`.
    std::fs::copy(&file, &out).expect("placing the finished file");
    std::fs::remove_file(&part).expect("removing the partial file");
    leecher.restart();
    leecher
        .proc
        .wait_for("recorded complete", Duration::from_secs(10));
    let st = download(leecher, &id);
    assert_eq!(st["state"]["state"], "complete", "{st}");
    assert_eq!(st["downloaded"], 0, "fetched again: {st}");
    assert_eq!(file_sha256(&out), file_sha256(&file));
    let status = leecher.status();
    let share = status["shares"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == id.as_str()).cloned())
        .unwrap_or_else(|| panic!("the finished download is not shared: {status}"));
    assert!(share["problem"].is_null(), "{share}");
    // And it stays so: nothing fails it later.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(download(leecher, &id)["state"]["state"], "complete");
}

/// A tmpfs of `mib` MiB mounted at `dir` for one test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// None (after [`p2p_tests::skip_unless_ci`]) where this process cannot mount one.
    fn mount(dir: &std::path::Path, mib: u32) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            p2p_tests::skip_unless_ci("mounting a tmpfs (needs root)");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_stalls_a_download_visibly_and_freeing_space_lets_it_finish() {
    let mut swarm = Swarm::new(1, "30s", &[]);
    swarm.add_daemon(&[]);
    let small = swarm.path("small");
    let Some(_tmpfs) = Tmpfs::mount(&small, 24) else {
        return;
    };
    // 12 MiB of the 24 are taken: a 20 MiB download runs out of space part way.
    let filler = small.join("filler");
    write_random(&filler, 12 << 20, 46);
    let file = swarm.path("big.bin");
    write_random(&file, 20 << 20, 47);
    let id = swarm.daemons[0].register(&file);
    let out = small.join("big.bin");
    let leecher = &swarm.daemons[1];

    // Attached, the command ends with the reason instead of waiting for ever.
    let stalled = leecher
        .ctl(&["download", &id, "-o", out.to_str().unwrap()])
        .fails();
    let expected = format!("stalled: no space left on device at {}", small.display());
    assert!(stalled.contains(&expected), "{stalled}");
    assert!(stalled.contains("more"), "how much is missing: {stalled}");
    let shown = leecher.ctl(&["status"]).ok();
    assert!(shown.contains(&expected), "{shown}");
    let st = download(leecher, &id);
    assert_eq!(st["state"]["state"], "running", "{st}");
    assert!(
        st["blocked"]
            .as_str()
            .is_some_and(|b| b.contains("no space")),
        "{st}"
    );
    let have = st["have"].as_u64().expect("have");
    assert!(have > 0, "nothing was written before the disk filled: {st}");

    // Space is freed: it goes on by itself, and no verified chunk is fetched twice.
    std::fs::remove_file(&filler).expect("freeing space");
    leecher.wait_complete(Duration::from_secs(60));
    assert_eq!(file_sha256(&out), file_sha256(&file));
    let st = download(leecher, &id);
    assert_eq!(st["downloaded"], 20 << 20, "{st}");
    assert!(st["blocked"].is_null(), "{st}");
}
