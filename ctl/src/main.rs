//! `p2pctl`: the command line for a local `p2pd`.
//!
//! Exit codes: 0 success, 1 the command failed (one line on stderr), 2 bad usage.

mod commands;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use p2p_schema::CtlRequest;
use p2pctl::{CtlError, LocalError};
use serde_json::json;

use commands::Output;

/// Control a local p2pd: share files, download them from the swarm, see who has what.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The daemon's control socket [default: p2pd.sock in p2pd's default data directory].
    #[arg(long, global = true, env = "P2PD_SOCKET")]
    socket: Option<PathBuf>,

    /// Print one JSON document on stdout instead of prose.
    #[arg(long, global = true)]
    json: bool,

    /// More output (per-chunk lines for download).
    #[arg(short, long, global = true)]
    verbose: bool,

    /// Less output: no progress bars, only results and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Share a local file with the network (hashes it, then announces it).
    ///
    /// Example: p2pctl register files/doug.png
    #[command(visible_alias = "r")]
    Register {
        /// The file to share.
        file: PathBuf,
        /// Bytes per chunk [default: chosen from the file's size].
        #[arg(long)]
        chunk_size: Option<u32>,
    },
    /// Download a file from the network by name, ID or unique ID prefix.
    ///
    /// Example: p2pctl download doug.png --output /tmp/
    #[command(visible_alias = "d")]
    Download {
        /// Name, ID or unique ID prefix (see `p2pctl list`).
        file: String,
        /// Where to write it: a file path, or an existing directory [default: the daemon's
        /// download directory].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Start the download and return at once; it continues in the daemon.
        #[arg(long)]
        detach: bool,
    },
    /// List the files registered on the network.
    ///
    /// Example: p2pctl list
    #[command(visible_alias = "lst")]
    List,
    /// Show which peers hold which chunks of a file.
    ///
    /// Example: p2pctl locate doug.png
    #[command(visible_alias = "loc")]
    Locate {
        /// Name, ID or unique ID prefix.
        file: String,
    },
    /// Show what this daemon shares and downloads: per transfer its name, ID, size, progress,
    /// speed, peers and state.
    ///
    /// Example: p2pctl status --watch
    Status {
        /// Keep refreshing (every --interval) until interrupted.
        #[arg(short, long)]
        watch: bool,
        /// How often --watch refreshes.
        #[arg(long, default_value = "1s", value_parser = p2p_service::parse_duration)]
        interval: std::time::Duration,
    },
    /// Make the daemon leave the network and exit.
    ///
    /// Example: p2pctl quit
    #[command(visible_alias = "q")]
    Quit,
    /// Pause a download (it stays paused across restarts).
    ///
    /// Example: p2pctl pause big.iso
    Pause {
        /// Name, ID or unique ID prefix of a download on this daemon.
        file: String,
    },
    /// Resume a paused or failed download.
    ///
    /// Example: p2pctl resume big.iso
    Resume {
        /// Name, ID or unique ID prefix of a download on this daemon.
        file: String,
    },
    /// Cancel a download and delete its partial file.
    ///
    /// Example: p2pctl cancel big.iso
    Cancel {
        /// Name, ID or unique ID prefix of a download on this daemon.
        file: String,
    },
    /// Stop sharing a file (the file itself is not touched).
    ///
    /// Example: p2pctl unregister doug.png
    Unregister {
        /// Name, ID or unique ID prefix of a file this daemon shares.
        file: String,
    },
    /// Print a shell completion script.
    ///
    /// Example: p2pctl completions bash > /etc/bash_completion.d/p2pctl
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff).
    ///
    /// Example: p2pctl man > /usr/local/share/man/man1/p2pctl.1
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e, json);
            ExitCode::FAILURE
        }
    }
}

/// Says why the command failed: one line on stderr, and with `--json` a document on stdout.
fn report(e: &CtlError, json: bool) {
    if json {
        let (code, message) = match e {
            CtlError::Refused(w) => (serde_json::to_value(w.code).ok(), w.message.clone()),
            CtlError::Ambiguous { .. } => (Some(json!("ambiguous")), e.to_string()),
            CtlError::NoDaemon(_) => (Some(json!("no_daemon")), e.to_string()),
            // Local and permission errors were reported as "protocol" before they had variants
            // of their own; scripts may match on the code, so it stays.
            CtlError::Forbidden(_) | CtlError::Protocol(_) | CtlError::Local(_) => {
                (Some(json!("protocol")), e.to_string())
            }
        };
        let mut doc = json!({ "error": { "code": code, "message": message } });
        if let CtlError::Ambiguous { candidates, .. } = e {
            doc["error"]["candidates"] = json!(candidates);
        }
        commands::print_json(&doc);
    }
    eprintln!("error: {e}");
}

/// Runs one command: one function per command, in `commands`.
async fn run(cli: Cli) -> Result<(), CtlError> {
    let out = Output {
        json: cli.json,
        verbose: cli.verbose,
        bars: !cli.json && !cli.quiet && std::io::stderr().is_terminal(),
    };
    let socket = || cli.socket.clone().unwrap_or_else(default_socket);
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "p2pctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => man(),
        Command::Register { file, chunk_size } => {
            commands::register(&socket(), &file, chunk_size, out).await
        }
        Command::Download {
            file,
            output,
            detach,
        } => commands::download(&socket(), file, output.as_deref(), detach, out).await,
        Command::List => commands::list(&socket(), out).await,
        Command::Locate { file } => commands::locate(&socket(), file, out).await,
        Command::Status { watch, interval } => {
            commands::status(&socket(), watch, interval, out).await
        }
        Command::Quit => commands::quit(&socket(), out).await,
        Command::Pause { file } => {
            let request = CtlRequest::Pause { query: file };
            commands::updated(&socket(), request, "Paused", out).await
        }
        Command::Resume { file } => {
            let request = CtlRequest::Resume { query: file };
            commands::updated(&socket(), request, "Resumed", out).await
        }
        Command::Cancel { file } => {
            let request = CtlRequest::Cancel { query: file };
            commands::updated(&socket(), request, "Cancelled", out).await
        }
        Command::Unregister { file } => {
            let request = CtlRequest::Unregister { query: file };
            commands::updated(&socket(), request, "No longer sharing", out).await
        }
    }
}

/// `p2pctl man`: the manual page in roff.
fn man() -> Result<(), CtlError> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut page)
        .map_err(LocalError::Manual)?;
    commands::print(&String::from_utf8_lossy(&page));
    Ok(())
}

/// The socket to use when none is given: the first that exists of the user service's, the
/// system service's and the default data directory's.
fn default_socket() -> PathBuf {
    let candidates = p2p_service::default_socket_candidates();
    candidates
        .iter()
        .find(|p| p.exists())
        .or(candidates.last())
        .cloned()
        .unwrap_or_else(|| PathBuf::from("p2pd.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
