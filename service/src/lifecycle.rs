//! A long-running program's life (feature `lifecycle`): settings from flags, file and defaults,
//! logging set-up, readiness (systemd's `READY=1`, or the `--daemon` parent waiting on a
//! pipe), detaching with `--daemon`, the runtime, the shutdown signal and the exit code.
//!
//! `--daemon` forks with the `daemonize` crate *before* any thread exists (the tokio runtime is
//! built afterwards). The parent waits on a pipe until the daemon reports it is ready, or why
//! it failed, and exits accordingly: `p2pd --daemon` returning 0 means the daemon is serving.

use std::io::{IsTerminal, Write};
use std::path::Path;

/// Sets up `tracing`: `RUST_LOG` if set, else `level`, to stderr. Colours only on a terminal;
/// no timestamps under systemd (journald adds its own).
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// Tells whoever started us that we are ready, or why we could not start.
pub struct Readiness {
    /// The pipe to a waiting `--daemon` parent, if any.
    pipe: Option<std::fs::File>,
}

impl Readiness {
    /// Readiness for a process running in the foreground (systemd may still be listening).
    pub fn foreground() -> Readiness {
        Readiness { pipe: None }
    }

    /// Serving now: tells systemd (`READY=1`, with a status line) and a waiting parent.
    pub fn ready(&mut self, status: &str) {
        #[cfg(unix)]
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ]);
        if let Some(mut pipe) = self.pipe.take() {
            let _ = writeln!(pipe, "ready {status}");
        }
    }

    /// Could not start: tells a waiting parent why (systemd sees the exit status).
    pub fn fail(&mut self, error: &str) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = writeln!(pipe, "error {error}");
        }
    }
}

/// Tells systemd we are stopping (`STOPPING=1`); nothing to tell elsewhere.
pub fn notify_stopping() {
    #[cfg(unix)]
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Which side of `--daemon` we are on.
pub enum Detached {
    /// The launching process: exit with this code (0: the daemon reported ready).
    Parent(u8),
    /// The daemon: report readiness through this.
    Daemon(Readiness),
}

/// Detaches into the background: forks (twice), starts a new session, takes the pid file
/// (refusing if another process holds it), sends stdout and stderr to `log_file`, and changes
/// to `/`. Must be called before any thread is started.
#[cfg(unix)]
pub fn detach(program: &str, pid_file: &Path, log_file: &Path) -> Result<Detached, String> {
    use std::os::fd::FromRawFd;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(|e| format!("opening log file {}: {e}", log_file.display()))?;
    let mut fds = [0; 2];
    // SAFETY: pipe() fills the two descriptors; each is owned by exactly one File below.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!(
            "creating a pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    let (read_end, write_end) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let outcome = daemonize::Daemonize::new()
        .pid_file(pid_file)
        .working_directory("/")
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .execute();
    match outcome {
        daemonize::Outcome::Parent(Err(e)) => Err(format!("detaching: {e}")),
        daemonize::Outcome::Parent(Ok(_)) => {
            drop(write_end);
            Ok(Detached::Parent(wait_for_daemon(
                program, read_end, pid_file, log_file,
            )))
        }
        daemonize::Outcome::Child(Err(e)) => {
            let mut pipe = write_end;
            let why = match e.to_string() {
                s if s.contains("lock") => format!(
                    "another {program} holds the pid file {} ({s})",
                    pid_file.display()
                ),
                s => s,
            };
            let _ = writeln!(pipe, "error {why}");
            std::process::exit(1);
        }
        daemonize::Outcome::Child(Ok(_)) => {
            drop(read_end);
            Ok(Detached::Daemon(Readiness {
                pipe: Some(write_end),
            }))
        }
    }
}

/// The parent's side: relays the daemon's first word and turns it into an exit code.
#[cfg(unix)]
fn wait_for_daemon(program: &str, mut pipe: std::fs::File, pid_file: &Path, log: &Path) -> u8 {
    use std::io::Read;
    let mut said = String::new();
    let _ = pipe.read_to_string(&mut said);
    let said = said.lines().next().unwrap_or("");
    if let Some(status) = said.strip_prefix("ready ") {
        println!(
            "{program} started in the background ({status}); pid file {}, log {}",
            pid_file.display(),
            log.display()
        );
        0
    } else if let Some(error) = said.strip_prefix("error ") {
        eprintln!("{program}: error: {error}");
        1
    } else {
        eprintln!(
            "{program}: error: the daemon exited before it was ready; see {}",
            log.display()
        );
        1
    }
}

/// `--daemon` is Unix-only.
#[cfg(not(unix))]
pub fn detach(program: &str, _pid_file: &Path, _log_file: &Path) -> Result<Detached, String> {
    Err(format!(
        "{program}: --daemon is only supported on Unix; run it as a service instead"
    ))
}

/// Reads the configuration file of `program`: `explicit` if given (it must exist), else the
/// default one ([`crate::config_file_for`]) if it exists, else nothing. Returns the settings
/// and the file they came from.
pub fn load_config<T: serde::de::DeserializeOwned + Default>(
    explicit: Option<&Path>,
    program: &str,
) -> Result<(T, Option<std::path::PathBuf>), String> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match crate::config_file_for(program) {
            Some(p) if p.exists() => p,
            _ => return Ok((T::default(), None)),
        },
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("reading config file {}: {e}", path.display()))?;
    let settings = toml::from_str(&text).map_err(|e| {
        let msg = e.to_string().replace('\n', " ");
        format!("config file {}: {}", path.display(), msg.trim())
    })?;
    Ok((settings, Some(path)))
}

/// What the two daemons' settings give the shared start-up ([`start`]).
pub trait ServiceSettings: Sized + serde::de::DeserializeOwned + Default {
    /// The program's name, for messages and default paths.
    const PROGRAM: &'static str;
    /// Merges flags (with environment) over the configuration file over defaults.
    fn resolve(flags: Self, file: Self) -> Result<Self, String>;
    /// The effective settings as a configuration file (secrets hidden).
    fn to_toml(&self) -> String;
    /// The data directory (created, private, before anything else).
    fn data_dir(&self) -> std::path::PathBuf;
    /// With `--daemon`: the pid file and the log file.
    fn pid_and_log_files(&self) -> (std::path::PathBuf, std::path::PathBuf);
    /// The log level or filter.
    fn log_level(&self) -> &str;
}

/// The start-up both daemons share: read the configuration file, merge settings, answer
/// `--print-config`, create the data directory (mode 0700), detach for `--daemon`, set up
/// logging. Returns the settings and how to report readiness, or the exit code to exit with
/// now (after `--print-config`, in a `--daemon` parent, or on an error, already printed).
pub fn start<S: ServiceSettings>(
    flags: S,
    config: Option<&Path>,
    print_config: bool,
    daemon: bool,
) -> Result<(S, Readiness), std::process::ExitCode> {
    use std::process::ExitCode;
    let fail = |e: String| {
        eprintln!("{}: error: {e}", S::PROGRAM);
        ExitCode::FAILURE
    };
    let (file, source) = load_config::<S>(config, S::PROGRAM).map_err(fail)?;
    let settings = S::resolve(flags, file).map_err(fail)?;
    if print_config {
        if let Some(p) = source {
            println!("# read from {}", p.display());
        }
        print!("{}", settings.to_toml());
        return Err(ExitCode::SUCCESS);
    }
    create_private_dir(&settings.data_dir()).map_err(fail)?;
    let readiness = if daemon {
        let (pid, log) = settings.pid_and_log_files();
        match detach(S::PROGRAM, &pid, &log).map_err(fail)? {
            Detached::Parent(code) => return Err(ExitCode::from(code)),
            Detached::Daemon(r) => r,
        }
    } else {
        Readiness::foreground()
    };
    init_logging(settings.log_level());
    Ok((settings, readiness))
}

/// Turns the outcome of serving into an exit code, telling a waiting parent and the log why
/// it failed.
pub fn finish(
    program: &str,
    result: Result<(), String>,
    readiness: &mut Readiness,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            readiness.fail(&e);
            eprintln!("{program}: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Threads for blocking work (file I/O, hashing chunks). Tokio's default, 512, lets a burst of
/// small chunks' verifications spawn a hundred threads, each with stack touched: memory, not
/// speed (there are only so many cores).
const BLOCKING_THREADS: usize = 16;

/// The multi-threaded runtime a service runs on (built after any `--daemon` fork).
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
        .map_err(|e| format!("starting runtime: {e}"))
}

/// Installs the SIGINT/SIGTERM handlers now (call it first in the runtime, so that a signal
/// right after readiness still stops the service cleanly); the future resolves, logging it,
/// when one arrives.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let signal = signal_handlers();
    async move {
        signal.await;
        tracing::info!("signal received");
    }
}

/// Creates `dir` (and parents) if missing, private to its owner (mode 0700).
pub fn create_private_dir(dir: &Path) -> Result<(), String> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("restricting {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// The effective settings `s` as a configuration file; a set secret is mentioned, never shown
/// (its field must be `#[serde(skip_serializing)]`).
pub fn settings_toml<T: serde::Serialize>(s: &T, secret_set: bool) -> String {
    let mut text = toml::to_string(s).unwrap_or_else(|e| format!("# cannot show: {e}\n"));
    if secret_set {
        text.push_str("# secret = (set, not shown)\n");
    }
    text
}

/// Implements [`ServiceSettings`] for a settings struct with the usual fields (`data_dir`,
/// `pid_file`, `log_file`, `log_level`, `secret`) and an inherent `resolve`.
#[macro_export]
macro_rules! service_settings {
    ($ty:ty, $program:expr) => {
        impl $crate::lifecycle::ServiceSettings for $ty {
            const PROGRAM: &'static str = $program;

            fn resolve(flags: Self, file: Self) -> Result<Self, String> {
                <$ty>::resolve(flags, file)
            }

            fn to_toml(&self) -> String {
                $crate::lifecycle::settings_toml(self, self.secret.is_some())
            }

            fn data_dir(&self) -> std::path::PathBuf {
                self.data_dir.clone().unwrap_or_default()
            }

            fn pid_and_log_files(&self) -> (std::path::PathBuf, std::path::PathBuf) {
                let get = |p: &Option<std::path::PathBuf>| p.clone().unwrap_or_default();
                (get(&self.pid_file), get(&self.log_file))
            }

            fn log_level(&self) -> &str {
                self.log_level.as_deref().unwrap_or("info")
            }
        }
    };
}

/// Implements `or` for a settings struct whose fields are all `Option`s: each field from
/// `self`, or else from `other`. This is how flags, the configuration file and the defaults
/// are layered. Name every field: the struct literal it expands to does not compile if one is
/// missing.
#[macro_export]
macro_rules! settings_or {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl $ty {
            /// Each field from `self`, or else from `other`.
            pub fn or(self, other: $ty) -> $ty {
                $ty { $($field: self.$field.or(other.$field)),* }
            }
        }
    };
}

/// A future that resolves on SIGINT or SIGTERM (Ctrl-C only, elsewhere). The handlers are
/// installed when this is called, not when it is first polled, so a signal that arrives
/// between start-up and the main loop is not lost. Call it inside the tokio runtime.
fn signal_handlers() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(term) => {}
                () = wait(int) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
