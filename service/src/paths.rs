//! Where things live by default: data and configuration directories, the control socket, and
//! the shared secret's file.

fn env_dir(key: &str) -> Option<std::path::PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
}

/// The default data directory of `program`: `$STATE_DIRECTORY` under systemd (for a system
/// service, `/var/lib/<program>`), else `$XDG_DATA_HOME/<program>`, else
/// `~/.local/share/<program>`, else `./<program>-data`.
pub fn data_dir_for(program: &str) -> std::path::PathBuf {
    if let Some(d) = env_dir("STATE_DIRECTORY") {
        // systemd may list several, separated by colons: ours is the first.
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        return std::path::PathBuf::from(first);
    }
    if let Some(d) = env_dir("XDG_DATA_HOME") {
        return d.join(program);
    }
    if let Some(h) = env_dir("HOME") {
        return h.join(".local/share").join(program);
    }
    std::path::PathBuf::from(format!("{program}-data"))
}

/// The default configuration file of `program`: `$CONFIGURATION_DIRECTORY/config.toml` under
/// systemd (for a system service, `/etc/<program>/config.toml`), else
/// `$XDG_CONFIG_HOME/<program>/config.toml` or `~/.config/<program>/config.toml`.
pub fn config_file_for(program: &str) -> Option<std::path::PathBuf> {
    if let Some(d) = env_dir("CONFIGURATION_DIRECTORY") {
        return Some(d.join("config.toml"));
    }
    let base = env_dir("XDG_CONFIG_HOME").or_else(|| env_dir("HOME").map(|h| h.join(".config")))?;
    Some(base.join(program).join("config.toml"))
}

/// The runtime directory systemd made for the service (`/run/<program>`, or
/// `$XDG_RUNTIME_DIR/<program>` for a user service), if any.
pub fn runtime_dir() -> Option<std::path::PathBuf> {
    env_dir("RUNTIME_DIRECTORY")
}

/// The daemon's default data directory (see [`data_dir_for`]).
pub fn default_data_dir() -> std::path::PathBuf {
    data_dir_for("p2pd")
}

/// Where `p2pctl` looks for the daemon's socket when not told: the first that exists of the
/// user service's (`$XDG_RUNTIME_DIR/p2pd/p2pd.sock`), the system service's
/// (`/run/p2pd/p2pd.sock`) and the default data directory's; else the last. On Windows only
/// the last: there is no runtime directory, and the "socket" is a named pipe.
pub fn default_socket_candidates() -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if cfg!(unix) {
        if let Some(r) = env_dir("XDG_RUNTIME_DIR") {
            out.push(r.join("p2pd").join("p2pd.sock"));
        }
        out.push(std::path::PathBuf::from("/run/p2pd/p2pd.sock"));
    }
    out.push(socket_in(&default_data_dir()));
    out
}

/// The control socket that belongs to a data directory: `p2pd.sock` inside it on Unix; on
/// Windows, where local sockets are named pipes outside the file system, the pipe
/// `\\.\pipe\p2pd@DIR`, named after the directory so that two daemons do not collide (a
/// pipe name may hold any character but a backslash).
pub fn socket_in(data_dir: &std::path::Path) -> std::path::PathBuf {
    if cfg!(windows) {
        let dir = data_dir.to_string_lossy().replace('\\', "/");
        std::path::PathBuf::from(format!(r"\\.\pipe\p2pd@{dir}"))
    } else {
        data_dir.join("p2pd.sock")
    }
}

/// `p` made absolute (against the current directory), or why it cannot be.
pub fn absolute(p: &std::path::Path) -> Result<std::path::PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
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
