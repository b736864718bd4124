//! The benchmark: real release binaries, timed from the leecher's start until the data is
//! complete and verified, repeated, medians printed as a table beside the tools people would
//! otherwise use (aria2c over BitTorrent and HTTP, curl), run on the same files in the same
//! run where they are installed.
//!
//! Run it with `bench/run` (builds release first); `p2p-bench --help` lists the flags:
//! `--quick` (smaller files, one repetition), `--reps N`, `--ns-reps N`, `--dir DIR`,
//! `--skip-S` for a section S (`loopback`, `others`, `namespaces`, `crowd`, `fleet`, `memory`,
//! `tracker`, `trees`), or `--only S`.

mod crowd;
mod lab;
mod measure;
mod others;
mod ours;
mod tracker_load;
mod trees;

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Parser;
use lab::Net;

const MIB: u64 = 1 << 20;

/// What one scenario measured for one tool: medians over the repetitions.
#[derive(Clone, Copy)]
pub struct Sample {
    pub seconds: f64,
    pub leecher_rss: f64,
    pub seeder_rss: f64,
}

/// Progress on stderr: one dot per timed run.
pub fn tick() {
    eprint!(".");
    let _ = std::io::stderr().flush();
}

/// The benchmark: this project against aria2c (BitTorrent and HTTP) and curl, on loopback and
/// in network namespaces with limited uplinks. Run it with `bench/run`, which builds release
/// binaries first.
#[derive(Parser, Debug)]
#[command(about, long_about = None)]
struct Args {
    /// Smaller files, one repetition.
    #[arg(long)]
    quick: bool,
    /// Loopback repetitions [default: 5, 1 with --quick].
    #[arg(long)]
    reps: Option<usize>,
    /// Namespace repetitions [default: 3, 1 with --quick].
    #[arg(long)]
    ns_reps: Option<usize>,
    /// Where the test files go [default: the temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Skip the loopback section.
    #[arg(long)]
    skip_loopback: bool,
    /// Skip the other tools (aria2c, nginx, curl, openssl).
    #[arg(long)]
    skip_others: bool,
    /// Skip the namespace section (3 sources behind limited uplinks).
    #[arg(long)]
    skip_namespaces: bool,
    /// Skip the crowd section (1 seeder and 10 or 40 leechers, ours and aria2c).
    #[arg(long)]
    skip_crowd: bool,
    /// Skip the fleet section (1 seeder and 100 leechers in namespaces, then 10 % killed).
    #[arg(long)]
    skip_fleet: bool,
    /// Skip the memory section (a large file's peak RSS).
    #[arg(long)]
    skip_memory: bool,
    /// Skip the tracker section (many peers, half-open connections).
    #[arg(long)]
    skip_tracker: bool,
    /// Skip the directory section (many small files, a large set, a restart).
    #[arg(long)]
    skip_trees: bool,
    /// Run this section only.
    #[arg(long, value_enum)]
    only: Option<Section>,
}

/// The sections `--only` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Loopback,
    Others,
    Namespaces,
    Crowd,
    Fleet,
    Memory,
    Tracker,
    Trees,
}

/// What to run, from the arguments.
struct Options {
    reps: usize,
    ns_reps: usize,
    quick: bool,
    dir: Option<PathBuf>,
    others: bool,
    namespaces: bool,
    crowd: bool,
    fleet: bool,
    memory: bool,
    tracker: bool,
    trees: bool,
    loopback: bool,
}

impl From<Args> for Options {
    fn from(a: Args) -> Options {
        // A section runs unless skipped, or unless `--only` names another.
        let on = |section: Section, skipped: bool| !skipped && a.only.is_none_or(|o| o == section);
        Options {
            reps: a.reps.unwrap_or(if a.quick { 1 } else { 5 }),
            ns_reps: a.ns_reps.unwrap_or(if a.quick { 1 } else { 3 }),
            quick: a.quick,
            others: on(Section::Others, a.skip_others),
            namespaces: on(Section::Namespaces, a.skip_namespaces),
            crowd: on(Section::Crowd, a.skip_crowd),
            fleet: on(Section::Fleet, a.skip_fleet),
            memory: on(Section::Memory, a.skip_memory),
            tracker: on(Section::Tracker, a.skip_tracker),
            trees: on(Section::Trees, a.skip_trees),
            loopback: on(Section::Loopback, a.skip_loopback),
            dir: a.dir,
        }
    }
}

/// One line of the table.
struct Row {
    scenario: String,
    tool: String,
    /// Whether the tool checks what it received (curl does not).
    verified: bool,
    ours: bool,
    bytes: u64,
    sample: Sample,
    marginal: Option<f64>,
    overhead: Option<f64>,
    /// For our rows: the best other verifying tool's time over ours.
    ratio: Option<f64>,
}

impl Row {
    /// A row as measured; the derived columns are filled in by [`derive()`].
    fn new(
        scenario: &str,
        tool: &str,
        verified: bool,
        ours: bool,
        bytes: u64,
        sample: Sample,
    ) -> Row {
        Row {
            scenario: scenario.into(),
            tool: tool.into(),
            verified,
            ours,
            bytes,
            sample,
            marginal: None,
            overhead: None,
            ratio: None,
        }
    }
}

const OURS: &str = "p2p (this project)";

/// Fills in marginal throughput and fixed overhead (from each tool's two sizes in a scenario)
/// and, for our rows, the ratio to the best other verifying tool at the same size.
fn derive(rows: &mut [Row]) {
    for i in 0..rows.len() {
        let small = (0..rows.len()).find(|&j| {
            rows[j].scenario == rows[i].scenario
                && rows[j].tool == rows[i].tool
                && rows[j].bytes < rows[i].bytes
        });
        if let Some(j) = small {
            let (s1, t1) = (rows[j].bytes as f64, rows[j].sample.seconds);
            let (s2, t2) = (rows[i].bytes as f64, rows[i].sample.seconds);
            if t2 > t1 {
                let marginal = (s2 - s1) / (t2 - t1);
                rows[i].marginal = Some(marginal / 1e6);
                rows[i].overhead = Some(t1 - s1 / marginal);
            }
        }
        if rows[i].ours {
            rows[i].ratio = rows
                .iter()
                .filter(|o| {
                    !o.ours
                        && o.verified
                        && !o.tool.starts_with("p2p,")
                        && o.scenario == rows[i].scenario
                        && o.bytes == rows[i].bytes
                })
                .map(|o| o.sample.seconds)
                .min_by(|a, b| a.total_cmp(b))
                .map(|best| best / rows[i].sample.seconds);
        }
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| scenario | tool | size MiB | median s | MB/s | marginal MB/s | fixed overhead s | best other / ours | leecher peak RSS MiB | seeder peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let opt = |v: Option<f64>, digits: usize| {
        v.map(|x| format!("{x:.digits$}"))
            .unwrap_or_else(|| "".into())
    };
    let mib = |v: f64| {
        if v.is_nan() {
            String::new()
        } else {
            format!("{v:.0}")
        }
    };
    for r in rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.tool,
            r.bytes / MIB,
            r.sample.seconds,
            r.bytes as f64 / r.sample.seconds / 1e6,
            opt(r.marginal, 0),
            opt(r.overhead, 2),
            r.ratio.map(|x| format!("{x:.2}x")).unwrap_or_default(),
            mib(r.sample.leecher_rss),
            mib(r.sample.seeder_rss),
        );
    }
}

/// Makes `file` durable, so that writing it back does not compete with what is measured
/// (it stays in the page cache, where every tool finds it).
fn settle(file: &Path) {
    if let Err(e) = std::fs::File::open(file).and_then(|f| f.sync_all()) {
        eprintln!("syncing {}: {e}", file.display());
    }
}

/// A fresh directory for one scenario run, under the bench directory.
fn scratch(base: &Path, name: &str) -> PathBuf {
    let dir = base.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench scratch directory");
    dir
}

/// Runs one external tool's scenario, turning a failure into a printed line.
fn other(
    rows: &mut Vec<Row>,
    scenario: &str,
    tool: &str,
    verified: bool,
    file: &Path,
    run: impl FnOnce() -> Result<Sample, String>,
) {
    let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    eprint!("{scenario}: {tool}, {} MiB ", bytes / MIB);
    match run() {
        Ok(sample) => {
            eprintln!(" {:.2} s", sample.seconds);
            rows.push(Row::new(scenario, tool, verified, false, bytes, sample));
        }
        Err(e) => eprintln!(" failed, left out of the table: {e}"),
    }
}

fn main() {
    let opts = Options::from(Args::parse());
    let base = opts
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("p2p-bench-{}", std::process::id()));
    let files = scratch(&base, "files");
    eprintln!(
        "p2p benchmark: release binaries in {}, files in {}, {} loopback and {} namespace repetitions",
        p2p_tests::bin_dir().display(),
        base.display(),
        opts.reps,
        opts.ns_reps
    );
    let missing = others::missing();
    let run_others = opts.others && missing.is_empty();
    let mut notes = Vec::new();
    if !opts.others {
        notes.push("other tools skipped (--skip-others)".to_string());
    } else if !missing.is_empty() {
        notes.push(format!(
            "other tools skipped: not installed: {} (apt-get install aria2 nginx opentracker mktorrent curl)",
            missing.join(", ")
        ));
    }
    let (mut rows, big_file) = loopback(&base, &files, &opts, run_others);
    let mut lines = Vec::new();
    match (
        opts.namespaces || opts.crowd || opts.fleet,
        lab::unavailable(),
    ) {
        (false, _) => notes.push("namespace scenarios skipped".into()),
        (true, Some(why)) => notes.push(format!("namespace scenarios skipped: {why}")),
        (true, None) => {
            lines.extend(namespaces(
                &mut rows, &base, &big_file, &files, &opts, run_others,
            ));
        }
    }
    if opts.crowd {
        // aria2c is part of the crowd section: it runs wherever the tools are installed.
        lines.extend(crowd::capped(&base, &files, opts.quick, missing.is_empty()));
    }
    if opts.memory {
        lines.push(memory(&base, &files, &rows, opts.quick));
    }
    if opts.trees {
        // As with crowds, aria2c's multi-file torrent runs wherever the tools are installed.
        lines.extend(trees::trees(&base, &files, opts.quick, missing.is_empty()));
    }
    report(&mut rows, &lines, &base, &opts, &notes);
    let _ = std::fs::remove_dir_all(&base);
}

/// Prints the table, the summary lines, the tracker's figures and the notes, on stdout.
fn report(rows: &mut [Row], lines: &[String], base: &Path, opts: &Options, notes: &[String]) {
    derive(rows);
    print_table(rows);
    println!();
    for line in lines {
        println!("{line}");
    }
    if opts.tracker {
        println!(
            "{}",
            tracker_load::tracker_load(base, if opts.quick { 2 } else { 5 })
        );
        println!("{}", tracker_load::half_open(base));
    }
    for note in notes {
        println!("{note}");
    }
}

/// The loopback scenarios at both sizes: ours from 3 sources and from 1 (with the time to
/// register), then the other tools. Returns the rows and the larger file, which the
/// namespace scenarios use.
fn loopback(base: &Path, files: &Path, opts: &Options, run_others: bool) -> (Vec<Row>, PathBuf) {
    let sizes: [u64; 2] = if opts.quick {
        [64 * MIB, 256 * MIB]
    } else {
        [256 * MIB, 1024 * MIB]
    };
    let mut rows = Vec::new();
    let mut big_file = PathBuf::new();
    for &size in &sizes {
        let file = files.join(format!("file-{}m.bin", size / MIB));
        big_file = file.clone();
        if !opts.loopback && !opts.namespaces {
            continue;
        }
        p2p_tests::write_random(&file, size as usize, size);
        settle(&file);
        if !opts.loopback {
            continue;
        }
        for seeders in [3, 1] {
            loopback_from(&mut rows, base, &file, seeders, opts, run_others);
        }
        if run_others && measure::installed("openssl") {
            let tool = "SHA-256 of the file alone (openssl, one core)";
            other(&mut rows, "reference", tool, false, &file, || {
                others::sha256_alone(base, &file, opts.reps)
            });
        }
    }
    (rows, big_file)
}

/// One loopback scenario: `file` from `seeders` sources, ours and then the other tools.
fn loopback_from(
    rows: &mut Vec<Row>,
    base: &Path,
    file: &Path,
    seeders: usize,
    opts: &Options,
    run_others: bool,
) {
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let scenario = if seeders == 3 {
        "loopback, 3 sources"
    } else {
        "loopback, 1 source"
    };
    let net = Net::loopback(seeders + 1);
    eprint!("{scenario}: {OURS}, {} MiB ", size / MIB);
    let dir = scratch(base, "ours");
    let (sample, register) = ours::download(&net, seeders, &dir, file, opts.reps, &[]);
    eprintln!(" {:.2} s", sample.seconds);
    if seeders == 3 {
        let hashing = Sample {
            seconds: register,
            leecher_rss: f64::NAN,
            seeder_rss: sample.seeder_rss,
        };
        let scenario = "register (hash), loopback";
        rows.push(Row::new(scenario, OURS, true, false, size, hashing));
    }
    rows.push(Row::new(scenario, OURS, true, true, size, sample));
    if seeders == 1 {
        // The cost of encryption: the same download over Noise-encrypted links (what a
        // closed swarm always uses), no `sendfile`.
        let tool = "p2p, encrypted links (--encrypt; as a closed swarm)";
        eprint!("{scenario}: {tool}, {} MiB ", size / MIB);
        let dir = scratch(base, "ours-encrypted");
        let (sample, _) = ours::download(&net, seeders, &dir, file, opts.reps, &["--encrypt"]);
        eprintln!(" {:.2} s", sample.seconds);
        rows.push(Row::new(scenario, tool, true, false, size, sample));
    }
    if !run_others {
        return;
    }
    let tool = format!(
        "aria2c BitTorrent, {seeders} seeder{}, opentracker",
        if seeders > 1 { "s" } else { "" }
    );
    other(rows, scenario, &tool, true, file, || {
        others::bittorrent(&net, seeders, &scratch(base, "bt"), file, opts.reps)
    });
    if seeders == 3 {
        let tool = "aria2c HTTP from 3 nginx, sha-256 checked";
        other(rows, scenario, tool, true, file, || {
            others::http(&net, 3, true, &scratch(base, "http"), file, opts.reps)
        });
    } else {
        let tool = "curl from 1 nginx, nothing verified";
        other(rows, scenario, tool, false, file, || {
            others::http(&net, 1, false, &scratch(base, "http"), file, opts.reps)
        });
    }
}

/// The leecher's peak RSS for a large file (4 GiB; 1 GiB with `--quick`) beside the smallest
/// file of the loopback rows: a download's memory must not grow with the file.
fn memory(base: &Path, files: &Path, rows: &[Row], quick: bool) -> String {
    let size = if quick { 1024 * MIB } else { 4096 * MIB };
    let file = files.join(format!("big-{}m.bin", size / MIB));
    if let Err(e) = write_stream(&file, size) {
        return format!("memory scenario failed: writing {}: {e}", file.display());
    }
    settle(&file);
    eprint!("memory: 3 seeders -> 1 leecher, {} MiB ", size / MIB);
    let (sample, _) = ours::download(
        &Net::loopback(4),
        3,
        &scratch(base, "memory"),
        &file,
        1,
        &[],
    );
    eprintln!(" {:.2} s", sample.seconds);
    let _ = std::fs::remove_file(&file);
    let small = rows
        .iter()
        .filter(|r| r.ours && r.scenario.starts_with("loopback, 3"))
        .min_by_key(|r| r.bytes);
    let compare = small
        .map(|r| {
            format!(
                " against {:.1} MiB for {} MiB ({:+.0}%)",
                r.sample.leecher_rss,
                r.bytes / MIB,
                100.0 * (sample.leecher_rss / r.sample.leecher_rss - 1.0)
            )
        })
        .unwrap_or_default();
    format!(
        "memory: downloading {} MiB from 3 seeders ({:.2} s), the leecher's peak RSS was {:.1} MiB{compare}; seeders {:.1} MiB",
        size / MIB,
        sample.seconds,
        sample.leecher_rss,
        sample.seeder_rss
    )
}

/// Writes `size` pseudo-random bytes to `path` a block at a time (a whole file in memory
/// would make this process, not the one measured, the big one).
fn write_stream(path: &Path, size: u64) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()
}

/// Uplink rate of every namespace host, in Mbit/s.
const UPLINK_MBIT: u32 = 100;

/// The namespace scenarios: 3 seeders behind limited uplinks (ours and the other tools),
/// then one seeder and 10 leechers. Returns the summary lines.
fn namespaces(
    rows: &mut Vec<Row>,
    base: &Path,
    file: &Path,
    files: &Path,
    opts: &Options,
    run_others: bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    if opts.namespaces {
        lines.extend(three_sources(rows, base, file, opts, run_others));
    }
    if opts.fleet {
        lines.extend(fleet_crowd(base, files, opts.quick));
    }
    if !opts.crowd {
        return lines;
    }
    let size = if opts.quick { 32 * MIB } else { 128 * MIB };
    let crowd_file = files.join(format!("crowd-{}m.bin", size / MIB));
    p2p_tests::write_random(&crowd_file, size as usize, 7);
    settle(&crowd_file);
    match Net::namespaces(12, UPLINK_MBIT) {
        Err(e) => lines.push(format!("namespace crowd scenario failed: {e}")),
        Ok(net) => {
            eprint!(
                "{UPLINK_MBIT} Mbit/s uplinks, 1 seeder -> 10 leechers, {} MiB ",
                size / MIB
            );
            let c = ours::crowd(&net, &scratch(base, "ns-crowd"), &crowd_file, 10, &[]);
            eprintln!();
            lines.push(crowd::line(&net.label, "ours", 10, size, &c));
        }
    }
    lines
}

/// Uplinks of the fleet crowd, at a rate two cores can carry. Every byte crosses veth pairs,
/// a bridge and a token bucket, and is hashed by its receiver and synced to its disk: at 10
/// Mbit/s (125 MB/s for the hundred) the cores were 0 to 2 % idle through the crowd, most of
/// it in the kernel, and carried about 85 MB/s, so the crowd measured the cores. At 5 Mbit/s
/// (62.5 MB/s at most) they are 13 to 30 % idle.
const FLEET_MBIT: u32 = 5;

/// The fleet crowd: 1 seeder and 100 leechers (20 with `--quick`), each in its own
/// namespace, 64 MiB (16): once whole, once with a tenth of the leechers killed at random
/// moments mid-transfer.
fn fleet_crowd(base: &Path, files: &Path, quick: bool) -> Vec<String> {
    let (n, size) = if quick {
        (20, 16 * MIB)
    } else {
        (100, 64 * MIB)
    };
    let file = files.join(format!("fleet-{}m.bin", size / MIB));
    p2p_tests::write_random(&file, size as usize, 13);
    settle(&file);
    let net = match Net::namespaces(n + 2, FLEET_MBIT) {
        Ok(net) => net,
        Err(e) => return vec![format!("fleet crowd scenario failed: {e}")],
    };
    eprint!(
        "{FLEET_MBIT} Mbit/s uplinks, 1 seeder -> {n} leechers, {} MiB ",
        size / MIB
    );
    let c = ours::crowd(&net, &scratch(base, "fleet-crowd"), &file, n, &[]);
    eprint!(" then with {} killed ", n / 10);
    let l = ours::crowd_with_losses(
        &net,
        &scratch(base, "fleet-losses"),
        &file,
        n,
        n / 10,
        c.alone,
    );
    eprintln!();
    vec![
        format!(
            "{} (target 1.25x)",
            crowd::line(&net.label, "ours", n, size, &c)
        ),
        format!(
            "{}, ours, 1 seeder -> {n} leechers, {} MiB, {} killed at random moments mid-transfer: \
             the {} others done, slowest {:.2} s = {:.2}x alone (target 1.35x); {} failed, {} \
             corrupt; the seeder sent the file {:.2} times",
            net.label,
            size / MIB,
            l.killed,
            l.finished,
            l.slowest,
            l.slowest / c.alone,
            l.failed,
            l.corrupt,
            l.seeder_sent
        ),
    ]
}

/// 3 seeders behind limited uplinks, ours and the other tools; returns summary lines.
fn three_sources(
    rows: &mut Vec<Row>,
    base: &Path,
    file: &Path,
    opts: &Options,
    run_others: bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    let scenario = format!("{UPLINK_MBIT} Mbit/s uplinks, 3 sources");
    let uplinks = 3.0 * f64::from(UPLINK_MBIT) * 1e6 / 8.0;
    let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let share = |t: f64| 100.0 * bytes as f64 / t / uplinks;
    match Net::namespaces(4, UPLINK_MBIT) {
        Err(e) => lines.push(format!("namespace scenarios failed: {e}")),
        Ok(net) => {
            eprint!("{scenario}: {OURS}, {} MiB ", bytes / MIB);
            let (sample, _) =
                ours::download(&net, 3, &scratch(base, "ns-ours"), file, opts.ns_reps, &[]);
            eprintln!(" {:.2} s", sample.seconds);
            lines.push(format!(
                "{scenario}, {} MiB: {OURS} {:.1} s, {:.0}% of the {:.1} MB/s the uplinks allow",
                bytes / MIB,
                sample.seconds,
                share(sample.seconds),
                uplinks / 1e6
            ));
            rows.push(Row::new(&scenario, OURS, true, true, bytes, sample));
            if run_others {
                let before = rows.len();
                other(
                    rows,
                    &scenario,
                    "aria2c BitTorrent, 3 seeders",
                    true,
                    file,
                    || others::bittorrent(&net, 3, &scratch(base, "ns-bt"), file, opts.ns_reps),
                );
                other(
                    rows,
                    &scenario,
                    "aria2c HTTP from 3 nginx",
                    true,
                    file,
                    || others::http(&net, 3, true, &scratch(base, "ns-http"), file, opts.ns_reps),
                );
                for r in &rows[before..] {
                    lines.push(format!(
                        "{scenario}, {} MiB: {} {:.1} s, {:.0}% of the uplinks",
                        bytes / MIB,
                        r.tool,
                        r.sample.seconds,
                        share(r.sample.seconds)
                    ));
                }
            }
        }
    }
    lines
}
