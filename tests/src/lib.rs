//! The harness behind the multi-process tests and the swarm demo: it starts the real
//! `p2p-tracker`, `p2pd` and `p2pctl` binaries as child processes on loopback, each in its
//! own temporary directory, waits for their readiness lines instead of sleeping, and kills
//! them (by PID, through their `Child` handles) when dropped.
//!
//! Binaries come from the same target directory as the running test; the first use builds
//! them with `cargo build` so that `cargo test` alone is enough. `P2P_BIN_DIR` overrides the
//! directory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod fake;
pub mod metrics;
pub mod proxy;
pub mod secure;

pub use tempfile::TempDir;

/// How long one `p2pctl` command may run in a test before it counts as hung.
pub const CTL_LIMIT: Duration = Duration::from_secs(120);

/// How long a process may take to print a line we wait for.
pub const STARTUP: Duration = Duration::from_secs(20);

/// The directory holding the three binaries, building them on first use.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("P2P_BIN_DIR") {
            return PathBuf::from(d);
        }
        let exe = std::env::current_exe().expect("path of the running test binary");
        let mut dir = exe
            .parent()
            .expect("test binary has a directory")
            .to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "p2p-tracker",
            "-p",
            "p2pd",
            "-p",
            "p2pctl",
        ]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build for the binaries");
        assert!(status.success(), "cargo build of the binaries failed");
        dir
    })
}

/// A command running `program` through `prefix` (nothing, or e.g. `ip netns exec NAME`).
pub fn prefixed(prefix: &[&str], program: &Path) -> Command {
    match prefix.split_first() {
        None => Command::new(program),
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program);
            cmd
        }
    }
}

/// Path of binary `name`.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// The repository's `files/` directory.
pub fn sample(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../files")
        .join(name);
    std::fs::canonicalize(&path).unwrap_or(path)
}

/// Lines a child printed on stderr, shared with the thread that reads them.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// A running child process whose stderr is captured. Killed when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    log: Arc<Log>,
}

impl Proc {
    /// Starts `cmd` with stderr captured.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Plain logs, never colour codes.
        cmd.env("NO_COLOR", "1").env_remove("RUST_LOG");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Log::default());
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lines.lock().unwrap().push(line);
                sink.grew.notify_all();
            }
        });
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lines.lock().unwrap().join("\n")
    }

    /// Waits until a logged line contains `needle`; returns that line.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.try_wait_for(needle, timeout).unwrap_or_else(|| {
            panic!(
                "{} did not log {needle:?} within {timeout:?}; its log:\n{}",
                self.name,
                self.log()
            )
        })
    }

    /// Like [`Self::wait_for`], but `None` on timeout.
    pub fn try_wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            lines = self.log.grew.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Logged lines from index `from` on, and the index to continue from.
    pub fn lines_since(&self, from: usize) -> (Vec<String>, usize) {
        let lines = self.log.lines.lock().unwrap();
        let from = from.min(lines.len());
        (lines[from..].to_vec(), lines.len())
    }

    /// How many logged lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (Unix) to the process.
    pub fn signal(&self, signal: i32) {
        // Only our own child, by its PID.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling child") {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {timeout:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what each of its processes said.
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}\n-----", self.name, self.log());
        }
    }
}

/// A running tracker.
pub struct Tracker {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl Tracker {
    /// Starts a tracker on a free loopback port, with its registry in `data_dir`.
    pub fn start(data_dir: &Path, ttl: &str) -> Tracker {
        Self::start_on(data_dir, ttl, "127.0.0.1:0", &[])
    }

    /// Starts a tracker listening on `listen`, with extra flags.
    pub fn start_on(data_dir: &Path, ttl: &str, listen: &str, extra: &[&str]) -> Tracker {
        Self::start_in(&[], data_dir, ttl, listen, extra)
    }

    /// Like [`Tracker::start_on`], the command run through `prefix` (such as
    /// `ip netns exec NAME`, which execs it: the PID stays the tracker's).
    pub fn start_in(
        prefix: &[&str],
        data_dir: &Path,
        ttl: &str,
        listen: &str,
        extra: &[&str],
    ) -> Tracker {
        let mut cmd = prefixed(prefix, &bin("p2p-tracker"));
        cmd.args(["--listen", listen, "--ttl", ttl, "--data-dir"])
            .arg(data_dir)
            .args(extra);
        let proc = Proc::spawn("p2p-tracker", cmd);
        let line = proc.wait_for("listening on ", STARTUP);
        let addr = line
            .rsplit("listening on ")
            .next()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Tracker {
            proc,
            addr,
            data_dir: data_dir.to_path_buf(),
        }
    }
}

/// The result of one `p2pctl` run.
#[derive(Debug)]
pub struct CtlOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    /// Asserts success and returns stdout.
    pub fn ok(self) -> String {
        assert!(self.status.success(), "p2pctl failed: {self:#?}");
        self.stdout
    }

    /// Asserts failure with exit code 1 and one line on stderr; returns stderr.
    pub fn fails(self) -> String {
        assert_eq!(self.status.code(), Some(1), "expected exit 1: {self:#?}");
        assert_eq!(
            self.stderr.trim_end().lines().count(),
            1,
            "expected one line on stderr: {self:#?}"
        );
        self.stderr
    }

    /// Parses stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// A running peer daemon.
pub struct Daemon {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    /// Where it serves chunks.
    pub addr: SocketAddr,
    /// Its `--tracker` (one address, or several comma-separated).
    tracker: String,
    extra: Vec<String>,
    listen: String,
    prefix: Vec<String>,
}

impl Daemon {
    /// Starts a daemon with its data in `data_dir`, talking to `tracker`, and waits until it
    /// is connected to the tracker.
    pub fn start(data_dir: &Path, tracker: SocketAddr, extra: &[&str]) -> Daemon {
        let d = Self::start_unconnected(data_dir, tracker, extra);
        d.proc.wait_for("connected to the tracker", STARTUP);
        d
    }

    /// Starts a daemon given several trackers, and waits until it is connected to one.
    pub fn start_with_trackers(data_dir: &Path, trackers: &[SocketAddr], extra: &[&str]) -> Daemon {
        let list: Vec<String> = trackers.iter().map(SocketAddr::to_string).collect();
        let socket = data_dir.join("p2pd.sock");
        let d = Self::start_full(
            &[],
            "127.0.0.1:0",
            data_dir,
            &socket,
            &list.join(","),
            extra,
        );
        d.proc.wait_for("connected to the tracker", STARTUP);
        d
    }

    /// Starts a daemon and waits only for it to be ready (the tracker may be down).
    pub fn start_unconnected(data_dir: &Path, tracker: SocketAddr, extra: &[&str]) -> Daemon {
        Self::start_with_socket(data_dir, &data_dir.join("p2pd.sock"), tracker, extra)
    }

    /// Starts a daemon with its control socket at `socket`; waits until it is ready.
    pub fn start_with_socket(
        data_dir: &Path,
        socket: &Path,
        tracker: SocketAddr,
        extra: &[&str],
    ) -> Daemon {
        Self::start_full(
            &[],
            "127.0.0.1:0",
            data_dir,
            socket,
            &tracker.to_string(),
            extra,
        )
    }

    /// Starts a daemon serving peers on `listen`, run through `prefix` (such as
    /// `ip netns exec NAME`), and waits until it is connected to the tracker.
    pub fn start_in(
        prefix: &[&str],
        listen: &str,
        data_dir: &Path,
        tracker: SocketAddr,
        extra: &[&str],
    ) -> Daemon {
        let socket = data_dir.join("p2pd.sock");
        let d = Self::start_full(
            prefix,
            listen,
            data_dir,
            &socket,
            &tracker.to_string(),
            extra,
        );
        d.proc.wait_for("connected to the tracker", STARTUP);
        d
    }

    fn start_full(
        prefix: &[&str],
        listen: &str,
        data_dir: &Path,
        socket: &Path,
        tracker: &str,
        extra: &[&str],
    ) -> Daemon {
        let socket = socket.to_path_buf();
        let mut cmd = prefixed(prefix, &bin("p2pd"));
        cmd.args(["--tracker", tracker, "--listen", listen])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--socket")
            .arg(&socket)
            .args(extra);
        let name = format!(
            "p2pd {}",
            data_dir.file_name().unwrap_or_default().to_string_lossy()
        );
        let proc = Proc::spawn(&name, cmd);
        let line = proc.wait_for("p2pd ready", STARTUP);
        let addr = line
            .split("serving peers on ")
            .nth(1)
            .and_then(|s| s.split(|c: char| c == ',' || c.is_whitespace()).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Daemon {
            proc,
            data_dir: data_dir.to_path_buf(),
            socket,
            addr,
            tracker: tracker.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            listen: listen.to_string(),
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Starts the same daemon again (same data directory and flags) after it stopped.
    pub fn restart(&mut self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let prefix: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        let fresh = Daemon::start_full(
            &prefix,
            &self.listen,
            &self.data_dir,
            &self.socket,
            &self.tracker,
            &extra,
        );
        *self = fresh;
    }

    /// Runs `p2pctl --socket <ours> args...`. One that runs past [`CTL_LIMIT`] is killed
    /// and the test fails: a hang is a failure, not a stuck suite.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        let mut child = Command::new(bin("p2pctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running p2pctl");
        let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut out);
                }
                String::from_utf8_lossy(&out).into_owned()
            })
        };
        let stdout = drain(child.stdout.take().map(|r| Box::new(r) as _));
        let stderr = drain(child.stderr.take().map(|r| Box::new(r) as _));
        let deadline = Instant::now() + CTL_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for p2pctl") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("p2pctl {args:?} still running after {CTL_LIMIT:?}: it hangs");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        CtlOutput {
            status,
            stdout: stdout.join().expect("p2pctl stdout"),
            stderr: stderr.join().expect("p2pctl stderr"),
        }
    }

    /// `p2pctl --json args...`, asserting success; the parsed document.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        let doc = out.json();
        assert!(out.status.success(), "p2pctl failed: {out:#?}");
        doc
    }

    /// Registers `path`; returns the file ID.
    pub fn register(&self, path: &Path) -> String {
        let doc = self.ctl_json(&["register", path.to_str().expect("UTF-8 path")]);
        doc["file"]["id"].as_str().expect("file id").to_string()
    }

    /// `status --json`.
    pub fn status(&self) -> serde_json::Value {
        self.ctl_json(&["status"])
    }

    /// The status of this daemon's first download (`null` if none).
    pub fn download_status(&self) -> serde_json::Value {
        self.status()["downloads"][0].clone()
    }

    /// The command prefix it runs through (empty, or `ip netns exec NAME`).
    pub fn prefix(&self) -> Vec<&str> {
        self.prefix.iter().map(String::as_str).collect()
    }

    /// Scrapes its metrics (it must run with `--metrics`; `status` says where).
    pub fn metrics(&self) -> metrics::Scrape {
        let status = self.status();
        let addr = status["info"]["metrics"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no metrics address in {status}"));
        metrics::scrape(addr)
    }

    /// Waits until the first download holds at least `chunks` chunks; returns what it saw.
    pub fn wait_have(&self, chunks: u64) -> u64 {
        eventually(Duration::from_secs(60), || {
            let h = self.download_status()["have"].as_u64()?;
            (h >= chunks).then_some(h)
        })
        .unwrap_or_else(|| panic!("download never reached {chunks} chunks: {}", self.status()))
    }

    /// Waits until the first download is complete.
    pub fn wait_complete(&self, timeout: Duration) {
        eventually(timeout, || {
            (self.download_status()["state"]["state"] == "complete").then_some(())
        })
        .unwrap_or_else(|| panic!("download never completed: {}", self.status()));
    }
}

/// A tracker and daemons in one temporary directory.
pub struct Swarm {
    pub dir: TempDir,
    pub tracker: Tracker,
    pub daemons: Vec<Daemon>,
}

impl Swarm {
    /// A tracker (with `ttl`) and `n` connected daemons, each given `extra` flags.
    pub fn new(n: usize, ttl: &str, extra: &[&str]) -> Swarm {
        let dir = tempfile::Builder::new()
            .prefix("p2p-test-")
            .tempdir()
            .expect("temp dir");
        let tracker = Tracker::start(&dir.path().join("tracker"), ttl);
        let mut swarm = Swarm {
            dir,
            tracker,
            daemons: Vec::new(),
        };
        for _ in 0..n {
            swarm.add_daemon(extra);
        }
        swarm
    }

    /// Starts one more connected daemon; returns its index.
    pub fn add_daemon(&mut self, extra: &[&str]) -> usize {
        let i = self.daemons.len();
        let data = self.dir.path().join(format!("peer{}", i + 1));
        self.daemons
            .push(Daemon::start(&data, self.tracker.addr, extra));
        i
    }

    /// A path inside the swarm's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Writes `len` bytes of deterministic pseudo-random data to `path`.
pub fn write_random(path: &Path, len: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data).expect("writing test data");
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    p2p_schema::to_hex(&Sha256::digest(&data))
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Is this a CI run (`CI=true`, as `.ci/run` runs)? CI installs every prerequisite, so a
/// test that would skip for lack of one must fail there instead.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// For a test whose prerequisite (`what`) is missing: fails under CI (see [`in_ci`]);
/// elsewhere prints `SKIPPED: what` so the caller can return.
pub fn skip_unless_ci(what: &str) {
    assert!(
        !in_ci(),
        "a prerequisite is missing and CI=true (CI installs it): {what}"
    );
    eprintln!("SKIPPED: {what}");
}

/// A system user made for one test and removed when dropped. Declare it before the
/// processes that run as it, so that they are killed first.
pub struct ThrowawayUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// How often `useradd` / `userdel` are retried while another program (a package install)
/// holds the lock on `/etc/passwd`, and how long between tries.
const PASSWD_TRIES: u32 = 30;
const PASSWD_RETRY: Duration = Duration::from_millis(500);

/// Runs `program args`, retrying (bounded) while `/etc/passwd` or `/etc/group` is locked:
/// exit code 10 or "cannot lock" on stderr. Returns the last output.
fn passwd_tool(program: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
    let mut tries = 0;
    loop {
        let out = Command::new(program).args(args).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let locked = out.status.code() == Some(10) || stderr.contains("cannot lock");
        tries += 1;
        if out.status.success() || !locked || tries >= PASSWD_TRIES {
            return Ok(out);
        }
        let why = stderr.trim().replace('\n', "; ");
        eprintln!("{program}: the password file is locked ({why}); retrying");
        std::thread::sleep(PASSWD_RETRY);
    }
}

impl ThrowawayUser {
    /// Makes a new system user (no home, no shell); `None` if not root or `useradd` fails.
    pub fn create() -> Option<ThrowawayUser> {
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("p2pt{}x{n}", std::process::id());
        let out = passwd_tool(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ],
        )
        .ok()?;
        if !out.status.success() {
            eprintln!(
                "useradd {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").args([flag, &name]).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        let user = ThrowawayUser {
            uid: id("-u")?,
            gid: id("-g")?,
            name,
        };
        Some(user)
    }
}

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        match passwd_tool("userdel", &[&self.name]) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "userdel {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("userdel {}: {e}", self.name),
        }
    }
}

/// A memory figure of a running process from `/proc/PID/status`, in KiB: `VmRSS` (now) or
/// `VmHWM` (peak).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A TCP connection to `to` from loopback address `from` (any of 127.0.0.0/8 works on
/// Linux without setup): to test caps per address with several "hosts".
pub fn connect_from(
    from: std::net::Ipv4Addr,
    to: SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((from, 0)))?;
        socket.connect(to).await
    })?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}
