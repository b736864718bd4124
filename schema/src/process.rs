//! Helpers the three programs share outside the wire: command-line values, default paths,
//! and the shutdown signal.

/// Parses a duration as the command lines of all three programs take it: a number with an
/// optional unit, `ms`, `s` (the default), `m` or `h`: `500ms`, `30s`, `30`, `2m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("invalid duration {s:?}: expected a number and a unit, like 30s or 500ms")
    })?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?}: use ms, s, m or h"
            ))
        }
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// The daemon's default data directory: `$XDG_DATA_HOME/p2pd`, else `~/.local/share/p2pd`,
/// else `./p2pd-data`. `p2pd` and `p2pctl` both derive the default socket from it.
pub fn default_data_dir() -> std::path::PathBuf {
    let env = |k| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = env("XDG_DATA_HOME") {
        return std::path::PathBuf::from(d).join("p2pd");
    }
    if let Some(h) = env("HOME") {
        return std::path::PathBuf::from(h).join(".local/share/p2pd");
    }
    std::path::PathBuf::from("p2pd-data")
}

/// The control socket inside a data directory.
pub fn socket_in(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("p2pd.sock")
}

/// Reads a shared secret from the first line of `path` (an empty secret is refused).
pub fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading secret file {}: {e}", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    if secret.is_empty() {
        return Err(format!("secret file {} is empty", path.display()));
    }
    Ok(secret)
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C only, elsewhere).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            () = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
