//! One function per command that talks to the daemon. Each connects, sends its request, and
//! prints the answer as prose or (with `--json`) as one JSON document on stdout.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use p2p_schema::{CtlRequest, CtlResponse, FileSummary, WireError};
use p2p_service::HumanBytes;
use p2pctl::{
    absolute, format_list, format_locate, format_status, unexpected, Client, CtlError, JsonHolder,
};
use serde_json::json;

/// How to show results, from the global flags.
#[derive(Clone, Copy)]
pub struct Output {
    /// `--json`: one document on stdout instead of prose.
    pub json: bool,
    /// `--verbose`: a line per received chunk.
    pub verbose: bool,
    /// Progress bars on stderr (a terminal, and neither `--json` nor `--quiet`).
    pub bars: bool,
}

/// `p2pctl register FILE`: the daemon hashes the file (a progress bar meanwhile) and shares it.
pub async fn register(
    socket: &Path,
    file: &Path,
    chunk_size: Option<u32>,
    out: Output,
) -> Result<(), CtlError> {
    // Check the path before bothering the daemon.
    if !file.exists() {
        return Err(CtlError::Refused(WireError::new(
            p2p_schema::ErrorCode::NotFound,
            format!("{}: no such file", file.display()),
        )));
    }
    let mut client = Client::connect(socket).await?;
    let path = absolute(file)?;
    client
        .send(&CtlRequest::Register { path, chunk_size })
        .await?;
    let bar = out.bars.then(|| bytes_bar("hashing"));
    let answer = loop {
        match client.next().await {
            Ok(CtlResponse::Hashing { done, total }) => {
                if let Some(b) = &bar {
                    b.set_length(total);
                    b.set_position(done);
                }
            }
            other => break other,
        }
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match answer? {
        CtlResponse::Registered {
            file,
            path,
            collection: Some(tree),
        } => {
            registered_tree(&file, &path, &tree, out);
            Ok(())
        }
        CtlResponse::Registered { file, path, .. } => {
            if out.json {
                print_json(&json!({ "file": file, "path": path }));
            } else {
                print(&format!(
                    "Registration of {} of size {} bytes successful.\nID: {}\n",
                    file.name, file.size, file.id
                ));
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// What `register DIR` prints: the collection's line, its ID, and what was skipped.
fn registered_tree(file: &FileSummary, path: &str, tree: &p2p_schema::CollectionInfo, out: Output) {
    if out.json {
        print_json(&json!({ "file": file, "path": path, "collection": tree }));
        return;
    }
    let mut text = format!(
        "Registration of {}/ ({} files, {}) successful.\nID: {}\n",
        file.name,
        tree.files,
        HumanBytes(tree.bytes),
        file.id
    );
    if !tree.skipped.is_empty() {
        let _ = writeln!(
            text,
            "Skipped {} entries that are not regular files or directories{}",
            tree.skipped.len(),
            if out.verbose {
                ":"
            } else {
                " (-v lists them)."
            }
        );
        if out.verbose {
            for s in &tree.skipped {
                let _ = writeln!(text, "  {s}");
            }
        }
    }
    print(&text);
}

/// `p2pctl download FILE`: starts the download, then follows it to the end unless `--detach`.
pub async fn download(
    socket: &Path,
    query: String,
    output: Option<&Path>,
    detach: bool,
    out: Output,
) -> Result<(), CtlError> {
    let mut client = Client::connect(socket).await?;
    let output = output.map(absolute).transpose()?;
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
        if out.json {
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
    follow(&mut client, &file, out).await
}

/// What a followed download printed on the way: the chunks and where each came from.
#[derive(Default)]
struct Received {
    chunks: Vec<serde_json::Value>,
    sources: BTreeSet<std::net::SocketAddr>,
}

impl Received {
    /// Chunk `index` of `total` came from `from`: noted, and printed with `-v`.
    fn chunk(
        &mut self,
        index: u32,
        total: u32,
        from: std::net::SocketAddr,
        out: Output,
        bar: Option<&ProgressBar>,
    ) {
        self.sources.insert(from);
        self.chunks
            .push(json!({ "index": index + 1, "from": from }));
        if out.verbose && !out.json {
            let line = format!("Received chunk {} of {total} from {from}", index + 1);
            match bar {
                Some(b) => b.println(line),
                None => print(&format!("{line}\n")),
            }
        }
    }
}

/// Shows a started download's progress until it completes; Ctrl-C detaches from it.
async fn follow(client: &mut Client, file: &FileSummary, out: Output) -> Result<(), CtlError> {
    let bar = out.bars.then(|| {
        let b = bytes_bar("downloading");
        b.set_length(file.size);
        b
    });
    let mut received = Received::default();
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
                received.chunk(index, total, from, out, bar.as_ref());
                if let Some(b) = &bar {
                    b.set_position(u64::from(have) * u64::from(file.chunk_size));
                }
            }
            Ok(CtlResponse::Progress {
                files_done,
                files,
                bytes_done,
                bytes,
            }) => {
                if let Some(b) = &bar {
                    b.set_length(bytes);
                    b.set_position(bytes_done);
                    b.set_message(format!("{files_done}/{files} files"));
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
    if out.json {
        print_json(&json!({
            "file": file,
            "output": output,
            "peers": peers,
            "sources": received.sources,
            "chunks": received.chunks,
        }));
    } else {
        let slash = if file.collection { "/" } else { "" };
        print(&format!(
            "{}{slash} has completed downloading.\nSaved to {output}\n",
            file.name
        ));
    }
    Ok(())
}

/// `p2pctl list`: the files registered on the network.
pub async fn list(socket: &Path, out: Output) -> Result<(), CtlError> {
    let mut client = Client::connect(socket).await?;
    match client.call(CtlRequest::List).await? {
        CtlResponse::Files { files } => {
            if out.json {
                print_json(&json!({ "files": files }));
            } else {
                print(&format_list(&files));
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `p2pctl locate FILE`: which peers hold which chunks.
pub async fn locate(socket: &Path, query: String, out: Output) -> Result<(), CtlError> {
    let mut client = Client::connect(socket).await?;
    match client.call(CtlRequest::Locate { query }).await? {
        CtlResponse::Located { file, holders } => {
            if out.json {
                let holders: Vec<JsonHolder> = holders.iter().map(JsonHolder::from).collect();
                print_json(&json!({ "file": file, "holders": holders }));
            } else {
                print(&format_locate(&holders));
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `p2pctl status [--watch]`: this daemon's shares and downloads, once or every `interval`.
pub async fn status(
    socket: &Path,
    watch: bool,
    interval: Duration,
    out: Output,
) -> Result<(), CtlError> {
    let terminal = std::io::stdout().is_terminal();
    loop {
        // One command per connection: each refresh connects again.
        let mut client = Client::connect(socket).await?;
        match client.call(CtlRequest::Status).await? {
            CtlResponse::Status(report) => {
                if out.json {
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
    }
}

/// `p2pctl quit`: the daemon leaves the network and exits.
pub async fn quit(socket: &Path, out: Output) -> Result<(), CtlError> {
    let mut client = Client::connect(socket).await?;
    match client.call(CtlRequest::Quit).await? {
        CtlResponse::Ok => {
            if out.json {
                print_json(&json!({ "ok": true }));
            } else {
                print("The daemon is leaving the network.\n");
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `pause`, `resume`, `cancel` and `unregister`: a request answered by `Updated`; says what
/// happened with `verb`.
pub async fn updated(
    socket: &Path,
    request: CtlRequest,
    verb: &str,
    out: Output,
) -> Result<(), CtlError> {
    let mut client = Client::connect(socket).await?;
    match client.call(request).await? {
        CtlResponse::Updated { file } => {
            if out.json {
                print_json(&json!({ "file": file }));
            } else {
                print(&format!("{verb} {} (ID {}).\n", file.name, file.id.short()));
            }
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// Prints `doc` on stdout, pretty, with a final newline.
pub fn print_json(doc: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (piped into `head`) is not an error worth reporting.
    let _ = serde_json::to_writer_pretty(&mut out, doc);
    let _ = writeln!(out);
}

/// Prints `text` on stdout as is.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
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
