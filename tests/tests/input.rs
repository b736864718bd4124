//! Bad input from users, odd names and sizes, and who may control a daemon or join a tracker.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use p2p_schema::frame::encode_frame;
use p2p_schema::{FileId, PeerId, PeerRequest, PeerResponse, PROTOCOL_VERSION};
use p2p_tests::fake::read_frame;
use p2p_tests::{
    bin, file_sha256, sample, skip_unless_ci, write_random, Daemon, Swarm, ThrowawayUser, Tracker,
};

#[test]
fn names_with_spaces_and_unicode_work_and_non_utf8_paths_are_a_clear_error() {
    let swarm = Swarm::new(2, "30s", &[]);
    let name = "my file ünï ✓.txt";
    let src = swarm.path(name);
    write_random(&src, 50_000, 50);
    swarm.daemons[0].register(&src);
    let list = swarm.daemons[1].ctl(&["list"]).ok();
    assert!(
        list.contains(&format!("Name: {name} Size: 50000 bytes")),
        "{list}"
    );
    let dir = swarm.path("out dir");
    std::fs::create_dir(&dir).unwrap();
    let doc = swarm.daemons[1].ctl_json(&["download", name, "-o", dir.to_str().unwrap()]);
    assert_eq!(doc["output"], dir.join(name).to_str().unwrap());
    assert_eq!(file_sha256(&dir.join(name)), file_sha256(&src));

    use std::os::unix::ffi::OsStrExt;
    let bad = swarm
        .dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"bad\xff.bin"));
    std::fs::write(&bad, b"data").unwrap();
    let out = Command::new(bin("p2pctl"))
        .arg("--socket")
        .arg(&swarm.daemons[0].socket)
        .arg("register")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not valid UTF-8"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1);
}

#[test]
fn devices_directories_and_unwritable_targets_are_refused_before_any_transfer() {
    let swarm = Swarm::new(2, "30s", &[]);
    let err = swarm.daemons[0].ctl(&["register", "/dev/null"]).fails();
    assert!(err.contains("not a regular file"), "{err}");
    swarm.daemons[0].register(&sample("doug.png"));
    // /proc exists but nothing can be created in it.
    let err = swarm.daemons[1]
        .ctl(&["download", "doug.png", "-o", "/proc/doug.png"])
        .fails();
    assert!(err.contains("cannot create /proc/doug.png.part"), "{err}");
    assert!(swarm.daemons[1].status()["downloads"]
        .as_array()
        .unwrap()
        .is_empty());
    // An empty file registers and downloads.
    let empty = swarm.path("empty");
    std::fs::write(&empty, b"").unwrap();
    swarm.daemons[0].register(&empty);
    let out = swarm.path("empty-copy");
    swarm.daemons[1]
        .ctl(&["download", "empty", "-o", out.to_str().unwrap()])
        .ok();
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
}

#[test]
fn files_over_4_gib_register_and_serve_chunks_past_4_gib() {
    let swarm = Swarm::new(1, "30s", &[]);
    let big = swarm.path("big.img");
    let size: u64 = (4 << 30) + (3 << 20) + 5;
    // Sparse, with distinctive bytes at the end.
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(size).unwrap();
    let tail: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 253) as u8).collect();
    std::os::unix::fs::FileExt::write_all_at(&f, &tail, size - tail.len() as u64).unwrap();
    drop(f);
    let doc = swarm.daemons[0].ctl_json(&["register", big.to_str().unwrap()]);
    assert_eq!(doc["file"]["size"], size);
    let chunk = doc["file"]["chunk_size"].as_u64().unwrap();
    let chunks = doc["file"]["chunks"].as_u64().unwrap();
    assert_eq!(chunks, size.div_ceil(chunk));
    let id: FileId = doc["file"]["id"].as_str().unwrap().parse().unwrap();

    // Ask the daemon for the last chunk over the peer protocol: it comes from past 4 GiB.
    let mut s = std::net::TcpStream::connect(swarm.daemons[0].addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    encode_frame(
        &PeerRequest::Hello {
            version: PROTOCOL_VERSION,
            peer_id: PeerId([3; 16]),
            agent: "test".into(),
        },
        &mut buf,
    )
    .unwrap();
    let last = (chunks - 1) as u32;
    encode_frame(
        &PeerRequest::GetChunk {
            file_id: id,
            index: last,
        },
        &mut buf,
    )
    .unwrap();
    s.write_all(&buf).unwrap();
    assert!(matches!(
        read_frame::<PeerResponse>(&mut s).unwrap(),
        Some(PeerResponse::Welcome { .. })
    ));
    let Some(PeerResponse::Chunk { index, len }) = read_frame::<PeerResponse>(&mut s).unwrap()
    else {
        panic!("no chunk");
    };
    assert_eq!(index, last);
    let offset = u64::from(last) * chunk;
    assert_eq!(u64::from(len), size - offset);
    let mut data = vec![0u8; len as usize];
    std::io::Read::read_exact(&mut s, &mut data).unwrap();
    let expected: Vec<u8> = {
        let mut v = vec![0u8; len as usize];
        let tail_start = size - tail.len() as u64;
        for (i, b) in v.iter_mut().enumerate() {
            let at = offset + i as u64;
            if at >= tail_start {
                *b = tail[(at - tail_start) as usize];
            }
        }
        v
    };
    assert!(data == expected, "the last chunk's bytes differ");
}

#[test]
fn the_daemon_refuses_a_socket_directory_others_can_write_to() {
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(bin("p2pd"))
        .args([
            "--tracker",
            "127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--socket")
        .arg(open.join("p2pd.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writable by other users"), "{err}");
    assert!(!open.join("p2pd.sock").exists());
}

#[test]
fn another_user_cannot_control_the_daemon() {
    // Declared first: removed last, after every process that runs as it.
    let Some(user) = ThrowawayUser::create() else {
        skip_unless_ci("needs root and useradd to make a second user");
        return;
    };
    // The socket's directory is world-readable (0755), so only the socket's own mode (0600)
    // stands between the other user and the daemon.
    let base = tempfile::tempdir().unwrap();
    let shared = tempfile::Builder::new()
        .prefix("p2p-sock-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tracker = Tracker::start(&base.path().join("tracker"), "30s");
    let socket = shared.path().join("p2pd.sock");
    let _daemon = Daemon::start_with_socket(&base.path().join("peer"), &socket, tracker.addr, &[]);
    use std::os::unix::process::CommandExt;
    let out = Command::new(bin("p2pctl"))
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .uid(user.uid)
        .gid(user.gid)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    // The owner still can.
    let out = Command::new(bin("p2pctl"))
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn a_tracker_with_a_secret_admits_only_daemons_that_know_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "s3cret-value\n").unwrap();
    let secret_arg = secret_file.to_str().unwrap().to_string();
    let tracker = Tracker::start_on(
        &dir.path().join("tracker"),
        "30s",
        "127.0.0.1:0",
        &["--secret-file", &secret_arg],
    );
    let outsider = Daemon::start_unconnected(&dir.path().join("outsider"), tracker.addr, &[]);
    outsider
        .proc
        .wait_for("requires a shared secret", Duration::from_secs(10));
    let err = outsider
        .ctl(&["register", sample("doug.png").to_str().unwrap()])
        .fails();
    assert!(err.contains("not yet announced"), "{err}");

    let member = Daemon::start(
        &dir.path().join("member"),
        tracker.addr,
        &["--secret-file", &secret_arg],
    );
    member.register(&sample("doug.png"));
    assert!(member.ctl(&["list"]).ok().contains("doug.png"));
    for log in [tracker.proc.log(), outsider.proc.log(), member.proc.log()] {
        assert!(!log.contains("s3cret-value"), "the secret was logged");
    }
}

#[test]
fn a_file_that_changes_while_it_is_hashed_is_refused() {
    let swarm = Swarm::new(1, "30s", &[]);
    let path = swarm.path("growing.log");
    write_random(&path, 64 << 20, 70);
    // Keep appending while the daemon hashes it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                f.write_all(b"another line\n").unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let err = swarm.daemons[0]
        .ctl(&["register", path.to_str().unwrap()])
        .fails();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    assert!(err.contains("changed while it was being hashed"), "{err}");
    assert!(swarm.daemons[0].status()["shares"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn a_file_the_daemon_cannot_read_is_a_clear_error() {
    // Declared first: removed last, after every process that runs as it.
    let Some(user) = ThrowawayUser::create() else {
        skip_unless_ci("needs root and useradd to run a daemon as another user");
        return;
    };
    // A daemon running as the throwaway user, and a file only root may read.
    let base = tempfile::Builder::new()
        .prefix("p2p-uid-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tracker = Tracker::start(&base.path().join("tracker"), "30s");
    let data = base.path().join("peer");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    unsafe {
        let c = std::ffi::CString::new(data.to_str().unwrap()).unwrap();
        libc::chown(c.as_ptr(), user.uid, user.gid);
    }
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin("p2pd"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--tracker",
        &tracker.addr.to_string(),
    ])
    .arg("--data-dir")
    .arg(&data)
    .uid(user.uid)
    .gid(user.gid);
    let daemon = p2p_tests::Proc::spawn("p2pd (other user)", cmd);
    daemon.wait_for("connected to the tracker", Duration::from_secs(20));
    let secret = base.path().join("root-only.bin");
    std::fs::write(&secret, b"not for you").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(bin("p2pctl"))
        .arg("--socket")
        .arg(data.join("p2pd.sock"))
        .arg("register")
        .arg(&secret)
        .uid(user.uid)
        .gid(user.gid)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read") && err.contains("ermission denied"),
        "{err}"
    );
}
