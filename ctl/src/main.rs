//! `p2pctl`: the command line for a local `p2pd`.
//!
//! Exit codes: 0 success, 1 the command failed (one line on stderr), 2 bad usage.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use p2p_schema::{CtlRequest, CtlResponse};
use p2pctl::{format_list, format_locate, format_status, unexpected, Client, CtlError, JsonHolder};
use serde_json::json;

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
        #[arg(long, default_value = "1s", value_parser = p2p_schema::parse_duration)]
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
            if json {
                let (code, message) = match &e {
                    CtlError::Refused(w) => (serde_json::to_value(w.code).ok(), w.message.clone()),
                    CtlError::Ambiguous { .. } => (Some(json!("ambiguous")), e.to_string()),
                    CtlError::NoDaemon(_) => (Some(json!("no_daemon")), e.to_string()),
                    CtlError::Protocol(_) => (Some(json!("protocol")), e.to_string()),
                };
                let mut doc = json!({ "error": { "code": code, "message": message } });
                if let CtlError::Ambiguous { candidates, .. } = &e {
                    doc["error"]["candidates"] = json!(candidates);
                }
                print_json(&doc);
            }
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(doc: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (piped into `head`) is not an error worth reporting.
    let _ = serde_json::to_writer_pretty(&mut out, doc);
    let _ = writeln!(out);
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn absolute(p: &Path) -> Result<String, CtlError> {
    let abs =
        std::path::absolute(p).map_err(|e| CtlError::Protocol(format!("{}: {e}", p.display())))?;
    abs.into_os_string().into_string().map_err(|p| {
        CtlError::Protocol(format!(
            "{}: paths that are not valid UTF-8 are not supported; rename it",
            Path::new(&p).display()
        ))
    })
}

async fn run(cli: Cli) -> Result<(), CtlError> {
    // Commands that need no daemon.
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "p2pctl", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(|e| CtlError::Protocol(format!("rendering the manual: {e}")))?;
            print(&String::from_utf8_lossy(&out));
            return Ok(());
        }
        _ => {}
    }
    let socket = cli.socket.clone().unwrap_or_else(default_socket);
    // Check local paths before bothering the daemon.
    if let Command::Register { file, .. } = &cli.command {
        if !file.exists() {
            return Err(CtlError::Refused(p2p_schema::WireError::new(
                p2p_schema::ErrorCode::NotFound,
                format!("{}: no such file", file.display()),
            )));
        }
    }
    let mut client = Client::connect(&socket).await?;
    let bars = !cli.json && !cli.quiet && std::io::stderr().is_terminal();
    match cli.command {
        Command::Register { file, chunk_size } => {
            let path = absolute(&file)?;
            client
                .send(&CtlRequest::Register {
                    path: path.clone(),
                    chunk_size,
                })
                .await?;
            let bar = bars.then(|| bytes_bar("hashing"));
            loop {
                match client.next().await {
                    Ok(CtlResponse::Hashing { done, total }) => {
                        if let Some(b) = &bar {
                            b.set_length(total);
                            b.set_position(done);
                        }
                    }
                    Ok(CtlResponse::Registered { file, path }) => {
                        if let Some(b) = &bar {
                            b.finish_and_clear();
                        }
                        if cli.json {
                            print_json(&json!({ "file": file, "path": path }));
                        } else {
                            print(&format!(
                                "Registration of {} of size {} bytes successful.\nID: {}\n",
                                file.name, file.size, file.id
                            ));
                        }
                        return Ok(());
                    }
                    Ok(other) => return Err(unexpected(other)),
                    Err(e) => {
                        if let Some(b) = &bar {
                            b.finish_and_clear();
                        }
                        return Err(e);
                    }
                }
            }
        }
        Command::Download {
            file,
            output,
            detach,
        } => {
            let output = output.as_deref().map(absolute).transpose()?;
            download(
                &mut client,
                file,
                output,
                detach,
                cli.json,
                cli.verbose,
                bars,
            )
            .await
        }
        Command::List => match client.call(CtlRequest::List).await? {
            CtlResponse::Files { files } => {
                if cli.json {
                    print_json(&json!({ "files": files }));
                } else {
                    print(&format_list(&files));
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        Command::Locate { file } => match client.call(CtlRequest::Locate { query: file }).await? {
            CtlResponse::Located { file, holders } => {
                if cli.json {
                    let holders: Vec<JsonHolder> = holders.iter().map(JsonHolder::from).collect();
                    print_json(&json!({ "file": file, "holders": holders }));
                } else {
                    print(&format_locate(&holders));
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        Command::Status { watch, interval } => {
            let terminal = std::io::stdout().is_terminal();
            loop {
                match client.call(CtlRequest::Status).await? {
                    CtlResponse::Status(report) => {
                        if cli.json {
                            print_json(&json!(report));
                        } else if watch && terminal {
                            // Clear the screen and redraw in place.
                            print(&format!("\x1b[H\x1b[2J{}", format_status(&report)));
                        } else {
                            print(&format_status(&report));
                        }
                    }
                    other => return Err(unexpected(other)),
                }
                if !watch {
                    return Ok(());
                }
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    () = tokio::time::sleep(interval) => {}
                }
                if !terminal {
                    print("\n");
                }
                client = Client::connect(&socket).await?;
            }
        }
        Command::Completions { .. } | Command::Man => Ok(()),
        Command::Pause { file } => {
            updated(
                &mut client,
                CtlRequest::Pause { query: file },
                "Paused",
                cli.json,
            )
            .await
        }
        Command::Resume { file } => {
            updated(
                &mut client,
                CtlRequest::Resume { query: file },
                "Resumed",
                cli.json,
            )
            .await
        }
        Command::Cancel { file } => {
            let r = updated(
                &mut client,
                CtlRequest::Cancel { query: file },
                "Cancelled",
                cli.json,
            );
            r.await
        }
        Command::Unregister { file } => {
            let r = CtlRequest::Unregister { query: file };
            updated(&mut client, r, "No longer sharing", cli.json).await
        }
        Command::Quit => match client.call(CtlRequest::Quit).await? {
            CtlResponse::Ok => {
                if cli.json {
                    print_json(&json!({ "ok": true }));
                } else {
                    print("The daemon is leaving the network.\n");
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        },
    }
}

/// Runs a command answered by `Updated` and says what happened.
async fn updated(
    client: &mut Client,
    request: CtlRequest,
    verb: &str,
    json: bool,
) -> Result<(), CtlError> {
    match client.call(request).await? {
        CtlResponse::Updated { file } => {
            if json {
                print_json(&json!({ "file": file }));
            } else {
                print(&format!("{verb} {} (ID {}).\n", file.name, file.id.short()));
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// The socket to use when none is given: the first that exists of the user service's, the
/// system service's and the default data directory's.
fn default_socket() -> PathBuf {
    let candidates = p2p_schema::default_socket_candidates();
    candidates
        .iter()
        .find(|p| p.exists())
        .or(candidates.last())
        .cloned()
        .unwrap_or_else(|| PathBuf::from("p2pd.sock"))
}

fn bytes_bar(what: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

async fn download(
    client: &mut Client,
    query: String,
    output: Option<String>,
    detach: bool,
    json: bool,
    verbose: bool,
    bars: bool,
) -> Result<(), CtlError> {
    client
        .send(&CtlRequest::Download {
            query,
            output,
            follow: !detach,
        })
        .await?;
    let (file, output_path, have) = match client.next().await? {
        CtlResponse::Started { file, output, have } => (file, output, have),
        other => return Err(unexpected(other)),
    };
    if detach {
        if json {
            print_json(
                &json!({ "file": file, "output": output_path, "have": have, "detached": true }),
            );
        } else {
            print(&format!(
                "Downloading {} to {} in the background; see 'p2pctl status'.\n",
                file.name, output_path
            ));
        }
        return Ok(());
    }
    let bar = bars.then(|| {
        let b = bytes_bar("downloading");
        b.set_length(file.size);
        b
    });
    let mut chunks = Vec::new();
    let mut sources = BTreeSet::new();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let result = loop {
        let next = tokio::select! {
            _ = &mut interrupted => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                // Ctrl-C detaches: the daemon carries on with the download.
                eprintln!(
                    "Detached: {} keeps downloading in the daemon; see 'p2pctl status' (or 'p2pctl cancel {}').",
                    file.name,
                    file.id.short()
                );
                return Ok(());
            }
            n = client.next() => n,
        };
        match next {
            Ok(CtlResponse::Chunk {
                index,
                total,
                from,
                have,
            }) => {
                sources.insert(from);
                chunks.push(json!({ "index": index + 1, "from": from }));
                if verbose && !json {
                    let line = format!("Received chunk {} of {total} from {from}", index + 1);
                    match &bar {
                        Some(b) => b.println(line),
                        None => print(&format!("{line}\n")),
                    }
                }
                if let Some(b) = &bar {
                    b.set_position(u64::from(have) * u64::from(file.chunk_size));
                }
            }
            Ok(CtlResponse::Completed {
                file,
                output,
                peers,
            }) => break Ok((file, output, peers)),
            Ok(other) => break Err(unexpected(other)),
            Err(e) => break Err(e),
        }
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let (file, output, peers) = result?;
    if json {
        print_json(&json!({
            "file": file,
            "output": output,
            "peers": peers,
            "sources": sources,
            "chunks": chunks,
        }));
    } else {
        print(&format!(
            "{} has completed downloading.\nSaved to {output}\n",
            file.name
        ));
    }
    Ok(())
}
