//! Running it as a service: systemd units, --daemon, configuration precedence, and the CLI's
//! terminal behaviour (progress bars, completions, man page, Ctrl-C).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use p2p_tests::{bin, eventually, file_sha256, sample, write_random, Swarm, Tracker};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let Ok(which) = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
    else {
        panic!("no shell");
    };
    if !which.status.success() {
        p2p_tests::skip_unless_ci("systemd-analyze is not installed (.ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // ExecStart must name an existing executable: point it at the built binaries.
    let units = [
        (
            "systemd/p2p-tracker.service",
            "/usr/local/bin/p2p-tracker",
            "p2p-tracker",
            false,
        ),
        ("systemd/p2pd.service", "/usr/local/bin/p2pd", "p2pd", false),
        (
            "systemd/user/p2pd.service",
            "%h/.local/bin/p2pd",
            "p2pd",
            true,
        ),
    ];
    for (unit, exec, binary, user) in units {
        let text = std::fs::read_to_string(repo().join(unit)).unwrap();
        assert!(text.contains("Type=notify"), "{unit}");
        assert!(text.contains("NoNewPrivileges=yes"), "{unit}");
        let name = Path::new(unit).file_name().unwrap();
        let sub = if user {
            dir.path().join("user")
        } else {
            dir.path().to_path_buf()
        };
        std::fs::create_dir_all(&sub).unwrap();
        let path = sub.join(name);
        std::fs::write(&path, text.replace(exec, bin(binary).to_str().unwrap())).unwrap();
        let mut cmd = Command::new("systemd-analyze");
        if user {
            let runtime = dir.path().join("xdg-runtime");
            std::fs::create_dir_all(&runtime).unwrap();
            cmd.env("XDG_RUNTIME_DIR", runtime).arg("--user");
        }
        let out = cmd.arg("verify").arg(&path).output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{unit}: {said}");
        assert!(said.trim().is_empty(), "{unit} has warnings: {said}");
    }
}

/// Kills the daemon with this pid (one the test started) when dropped.
struct PidGuard(i32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if alive(self.0) {
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn daemon_mode_detaches_writes_its_pid_file_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(&dir.path().join("tracker"), "30s");
    let data = dir.path().join("peer");
    let socket = data.join("p2pd.sock");
    let pid_file = data.join("p2pd.pid");
    let start = || {
        Command::new(bin("p2pd"))
            .args(["--daemon", "--listen", "127.0.0.1:0", "--tracker"])
            .arg(tracker.addr.to_string())
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = start();
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("p2pd started in the background"), "{said}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _guard = PidGuard(pid);
    assert!(alive(pid));
    // Ready means serving: the socket answers at once.
    let status = Command::new(bin("p2pctl"))
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");

    // A second instance is refused: the pid file is held.
    let again = start();
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("another p2pd holds the pid file"), "{err}");

    unsafe { libc::kill(pid, libc::SIGTERM) };
    let gone = eventually(Duration::from_secs(10), || (!alive(pid)).then_some(()));
    assert!(gone.is_some(), "the daemon did not stop on SIGTERM");
    assert!(!socket.exists(), "socket removed");
    let log = std::fs::read_to_string(data.join("p2pd.log")).unwrap();
    assert!(
        log.contains("p2pd ready") && log.contains("stopped"),
        "{log}"
    );

    // The tracker detaches the same way.
    let tdata = dir.path().join("tracker2");
    let out = Command::new(bin("p2p-tracker"))
        .args(["--daemon", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&tdata)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let tpid: i32 = std::fs::read_to_string(tdata.join("p2p-tracker.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _tguard = PidGuard(tpid);
    unsafe { libc::kill(tpid, libc::SIGTERM) };
    assert!(eventually(Duration::from_secs(10), || (!alive(tpid)).then_some(())).is_some());
}

fn print_config(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(bin("p2pd"));
    cmd.arg("--print-config").args(args);
    for key in [
        "P2PD_TRACKER",
        "P2PD_UPLOAD_RATE",
        "P2PD_CONFIG",
        "P2PD_DATA_DIR",
        "P2PD_SOCKET",
    ] {
        cmd.env_remove(key);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn flags_beat_environment_beats_the_config_file_beats_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        "tracker = \"file.example:1\"\nupload-rate = 7\nmax-in-flight = 3\ndata-dir = \"/srv/p2pd\"\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let text = |o: std::process::Output| {
        assert!(o.status.success(), "{o:?}");
        String::from_utf8(o.stdout).unwrap()
    };
    let from_file = text(print_config(&["--config", c], &[]));
    assert!(
        from_file.contains("tracker = \"file.example:1\""),
        "{from_file}"
    );
    assert!(from_file.contains("upload-rate = 7"), "{from_file}");
    assert!(
        from_file.contains("download-dir = \"/srv/p2pd/downloads\""),
        "{from_file}"
    );
    assert!(
        from_file.contains("request-timeout = \"20s\""),
        "default: {from_file}"
    );

    let from_env = text(print_config(
        &["--config", c],
        &[("P2PD_TRACKER", "env.example:2"), ("P2PD_UPLOAD_RATE", "9")],
    ));
    assert!(
        from_env.contains("tracker = \"env.example:2\""),
        "{from_env}"
    );
    assert!(from_env.contains("upload-rate = 9"), "{from_env}");
    assert!(from_env.contains("max-in-flight = 3"), "{from_env}");

    let from_flag = text(print_config(
        &["--config", c, "--tracker", "flag.example:3"],
        &[("P2PD_TRACKER", "env.example:2")],
    ));
    assert!(
        from_flag.contains("tracker = \"flag.example:3\""),
        "{from_flag}"
    );

    std::fs::write(&cfg, "trackr = \"typo\"\n").unwrap();
    let bad = print_config(&["--config", c], &[]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("config file") && err.contains("trackr"),
        "{err}"
    );

    // The tracker reads its file the same way.
    std::fs::write(&cfg, "ttl = \"5s\"\nlisten = \"127.0.0.1:7171\"\n").unwrap();
    let out = Command::new(bin("p2p-tracker"))
        .args(["--print-config", "--config", c, "--ttl", "9s"])
        .output()
        .unwrap();
    let shown = text(out);
    assert!(
        shown.contains("ttl = \"9s\"") && shown.contains("127.0.0.1:7171"),
        "{shown}"
    );
}

#[test]
fn completions_and_the_man_page_are_generated_from_the_cli() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(bin("p2pctl"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["p2pctl", "register", "download", "locate", "unregister"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = Command::new(bin("p2pctl")).arg("man").output().unwrap();
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.starts_with(".ie") || man.contains(".TH p2pctl"),
        "{man}"
    );
    let help = Command::new(bin("p2pctl"))
        .args(["help", "download"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("Example: p2pctl download"));
}

/// Runs `p2pctl args...` under a pseudo-terminal (via `script`); returns everything it drew.
fn in_terminal(socket: &Path, args: &str) -> String {
    let cmd = format!(
        "{} --socket {} {args}",
        bin("p2pctl").display(),
        socket.display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script(1) from util-linux");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_terminal_gets_progress_bars_and_a_pipe_gets_none() {
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "3000000"]);
    swarm.add_daemon(&[]);
    swarm.add_daemon(&[]);
    let file = swarm.path("bar.bin");
    write_random(&file, 3 << 20, 60);
    let shown = in_terminal(
        &swarm.daemons[0].socket,
        &format!("register {}", file.display()),
    );
    assert!(shown.contains("Registration of bar.bin"), "{shown}");

    let out = swarm.path("tty.bin");
    let shown = in_terminal(
        &swarm.daemons[1].socket,
        &format!("download bar.bin -o {}", out.display()),
    );
    assert!(
        shown.contains("downloading [") && shown.contains("MiB"),
        "no bar: {shown:?}"
    );
    assert!(shown.contains("bar.bin has completed downloading."));

    let piped_out = swarm.path("pipe.bin");
    let piped = swarm.daemons[2].ctl(&["download", "bar.bin", "-o", piped_out.to_str().unwrap()]);
    assert!(piped.status.success());
    assert!(!piped.stderr.contains("downloading ["), "{piped:?}");
    assert!(
        !piped.stdout.contains('\x1b'),
        "no escape codes in a pipe: {piped:?}"
    );
    assert_eq!(file_sha256(&out), file_sha256(&file));
}

#[test]
fn ctrl_c_detaches_an_attached_download_which_then_finishes_in_the_daemon() {
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "2000000"]);
    swarm.add_daemon(&[]);
    let file = swarm.path("long.bin");
    write_random(&file, 4 << 20, 61);
    swarm.daemons[0].ctl_json(&["register", file.to_str().unwrap(), "--chunk-size", "65536"]);
    let out = swarm.path("long-copy.bin");
    let child = Command::new(bin("p2pctl"))
        .arg("--socket")
        .arg(&swarm.daemons[1].socket)
        .args(["download", "long.bin", "-o", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let leecher = &swarm.daemons[1];
    eventually(Duration::from_secs(20), || {
        let s = leecher.status();
        (s["downloads"][0]["have"].as_u64()? > 2).then_some(())
    })
    .expect("no progress");
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let result = child.wait_with_output().unwrap();
    assert!(result.status.success(), "{result:?}");
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(
        err.contains("Detached") && err.contains("p2pctl status"),
        "{err}"
    );
    eventually(Duration::from_secs(30), || {
        (leecher.status()["downloads"][0]["state"]["state"] == "complete").then_some(())
    })
    .expect("the download stopped with p2pctl");
    assert_eq!(file_sha256(&out), file_sha256(&file));
}

#[test]
fn status_watch_refreshes_and_the_tracker_reports_its_counters() {
    let swarm = Swarm::new(1, "30s", &[]);
    swarm.daemons[0].register(&sample("doug.png"));
    let mut child = Command::new(bin("p2pctl"))
        .arg("--socket")
        .arg(&swarm.daemons[0].socket)
        .args(["status", "--watch", "--interval", "100ms"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("Sharing 1 files").count() < 3 {
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        assert!(n > 0, "watch ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    child.kill().unwrap();
    let _ = child.wait();

    let out = Command::new(bin("p2p-tracker"))
        .args(["stats", "--json", "--tracker"])
        .arg(swarm.tracker.addr.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["files"], 1);
    assert_eq!(stats["peers"], 1);
    assert_eq!(stats["holdings"], 1);
    assert!(stats["requests"].as_u64().unwrap() >= 1);
}

#[test]
fn both_daemons_tell_systemd_when_they_are_ready_and_when_they_stop() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 1024];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };

    let mut tracker = Command::new(bin("p2p-tracker"));
    tracker
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("tracker"))
        .env("NOTIFY_SOCKET", &notify_path);
    let mut tracker = p2p_tests::Proc::spawn("p2p-tracker", tracker);
    let ready = recv();
    assert!(
        ready.contains("READY=1") && ready.contains("listening on 127.0.0.1:"),
        "{ready}"
    );
    let line = tracker.wait_for("listening on ", Duration::from_secs(5));
    let addr = line
        .rsplit("listening on ")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    let mut daemon = Command::new(bin("p2pd"));
    daemon
        .args(["--listen", "127.0.0.1:0", "--tracker", &addr, "--data-dir"])
        .arg(dir.path().join("peer"))
        .env("NOTIFY_SOCKET", &notify_path);
    let mut daemon = p2p_tests::Proc::spawn("p2pd", daemon);
    let ready = recv();
    assert!(
        ready.contains("READY=1") && ready.contains("control socket"),
        "{ready}"
    );
    daemon.signal(libc::SIGTERM);
    assert!(recv().contains("STOPPING=1"));
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
    tracker.signal(libc::SIGTERM);
    assert!(recv().contains("STOPPING=1"));
    assert!(tracker.wait_exit(Duration::from_secs(10)).success());
}
