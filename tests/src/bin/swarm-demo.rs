//! The local swarm demo: a tracker and three daemons as real processes on loopback, in a
//! temporary directory, going through every command of the prototype and printing a
//! transcript. `--keep` leaves the swarm running afterwards, for you to try `p2pctl` on.
//!
//! Run it with `cargo run -p p2p-tests --bin swarm-demo [-- --keep]`.

use std::io::Write;
use std::time::Duration;

use p2p_tests::{file_sha256, sample, Daemon, Swarm};

/// `println!` that ignores a closed stdout (`swarm-demo | head`): the demo carries on and
/// still stops every process it started, instead of panicking half-way.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

struct Demo {
    swarm: Swarm,
    tracker_seen: usize,
}

impl Demo {
    fn step(&mut self, title: &str) {
        self.tracker_news();
        say!("\n=== {title}");
    }

    /// Prints what the tracker said about peers since last time, in the prototype's words.
    fn tracker_news(&mut self) {
        let (lines, next) = self.swarm.tracker.proc.lines_since(self.tracker_seen);
        self.tracker_seen = next;
        for l in lines {
            if l.contains("has connected")
                || l.contains("has disconnected")
                || l.contains("Waiting for peers")
            {
                let msg = l.rsplit(": ").next().unwrap_or(&l);
                let msg = msg.split(" ttl=").next().unwrap_or(msg);
                say!("[tracker] {msg}");
            }
        }
    }

    fn ctl(&self, peer: usize, args: &[&str]) {
        say!("[peer{}] $ p2pctl {}", peer + 1, args.join(" "));
        let out = self.swarm.daemons[peer].ctl(args);
        for line in out.stdout.lines() {
            say!("[peer{}] {line}", peer + 1);
        }
        for line in out.stderr.lines() {
            say!("[peer{}] {line}", peer + 1);
        }
        let _ = std::io::stdout().flush();
    }
}

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    say!("P2P File Sharing Service: a local swarm demo");
    say!("Building and starting a tracker and three peer daemons on 127.0.0.1 ...");
    let swarm = Swarm::new(3, "5s", &[]);
    let mut demo = Demo {
        swarm,
        tracker_seen: 0,
    };
    say!("(everything lives in {})", demo.swarm.dir.path().display());
    let doug = sample("doug.png");
    let text = sample("sample.txt");
    let (doug, text) = (
        doug.to_str().unwrap_or("doug.png"),
        text.to_str().unwrap_or("sample.txt"),
    );

    demo.step("Registering files");
    demo.ctl(0, &["r", doug]);
    demo.ctl(1, &["r", doug]);
    demo.ctl(1, &["r", text]);

    demo.step("Requested file list");
    demo.ctl(2, &["lst"]);

    demo.step("Endpoints location request");
    demo.ctl(2, &["loc", "doug.png"]);

    demo.step("Downloading doug.png from several peers");
    let out = demo.swarm.path("peer3-doug.png");
    let out_str = out.to_str().unwrap_or("doug.png").to_string();
    demo.ctl(2, &["-v", "d", "doug.png", "--output", &out_str]);
    if out.exists() {
        let same = file_sha256(&out) == file_sha256(std::path::Path::new(doug));
        say!(
            "(sha256 of the copy {} the original)",
            if same { "matches" } else { "DOES NOT match" }
        );
    }

    demo.step("peer3 now seeds doug.png too");
    demo.ctl(2, &["loc", "doug.png"]);

    demo.step("Disconnecting peer1");
    demo.ctl(0, &["q"]);
    let _ = demo.swarm.daemons[0]
        .proc
        .wait_exit(Duration::from_secs(10));
    let gone = format!("{} has disconnected", demo.swarm.daemons[0].addr);
    demo.swarm
        .tracker
        .proc
        .wait_for(&gone, Duration::from_secs(10));
    demo.tracker_news();
    demo.ctl(2, &["loc", "doug.png"]);

    demo.step("A peer that joins later downloads from those still here");
    let late = Daemon::start(&demo.swarm.path("peer4"), demo.swarm.tracker.addr, &[]);
    demo.swarm.daemons.push(late);
    demo.tracker_news();
    let out4 = demo.swarm.path("peer4-sample.txt");
    let out4 = out4.to_str().unwrap_or("sample.txt").to_string();
    demo.ctl(3, &["-v", "d", "sample.txt", "-o", &out4]);

    demo.step("Status of peer3");
    demo.ctl(2, &["status"]);
    demo.tracker_news();

    if keep {
        say!("\nThe swarm keeps running. In another terminal, try:");
        for (i, d) in demo.swarm.daemons.iter().enumerate().skip(1) {
            say!(
                "  p2pctl --socket {} list    # peer{}",
                d.socket.display(),
                i + 1
            );
        }
        say!("(p2pctl is in {})", p2p_tests::bin_dir().display());
        say!("Press Ctrl-C to stop it.");
        loop {
            std::thread::sleep(Duration::from_millis(500));
            demo.tracker_news();
        }
    }
    say!("\nDone: every process stopped and the temporary directory was removed.");
}
