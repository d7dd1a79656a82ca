//! The `docker-on-top` daemon: parses the command line, opens the driver, acquires the plugin
//! socket and serves until a signal (or the idle timeout) arrives. The admin subcommands
//! (`ls`, `inspect`, `changes`, `recover`, `export`, `reset`, `commit`) print what
//! `docker_on_top::admin` does; any failure is one line on stderr and exit code 1.
//!
//! Wiring only: anything worth testing belongs in the library.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use docker_on_top::admin::{self, Admin, Change, ChangeKind};
use docker_on_top::driver::{Driver, DriverConfig};
use docker_on_top::logging;
use docker_on_top::names::VolumeName;
use docker_on_top::options::AllowedBases;
use docker_on_top::server::{self, Listening, ServeOptions};
use log::{error, info};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

/// Docker volume plugin: a copy-on-write (overlayfs) view of a host directory.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    opts: Opts,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the plugin socket (the default).
    Serve,
    /// List every volume: base, volatile, mounted, active mounts, size of its changes.
    Ls {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one volume as JSON.
    Inspect {
        /// The volume.
        name: String,
    },
    /// What a volume changed, one line per path: A added, C changed, D deleted.
    Changes {
        /// The volume.
        name: String,
        /// JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Copy a volume's added and changed entries into DEST (new or empty); list the deleted.
    Recover {
        /// The volume.
        name: String,
        /// Where to copy them: a new directory (its parent must exist) or an empty one.
        dest: PathBuf,
    },
    /// Write a volume's changes as a tar stream (OCI layer whiteouts).
    Export {
        /// The volume.
        name: String,
        /// Write to FILE instead of standard output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Discard the changes of a volume that is not mounted.
    Reset {
        /// The volume.
        name: String,
    },
    /// Apply the changes of a volume that is not mounted to its base, then reset it.
    Commit {
        /// The volume.
        name: String,
        /// Really do it; without it, only show what would change.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
struct Opts {
    /// The plugin socket to create (ignored when systemd passes one).
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "/run/docker/plugins/docker-on-top.sock"
    )]
    socket: PathBuf,
    /// The state directory.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "/var/lib/docker-on-top"
    )]
    root: PathBuf,
    /// Exit once no request has arrived for this long (e.g. 30s, 5min).
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_timeout)]
    idle_timeout: Option<Duration>,
    /// Mount with legacy mount(2) even where the new mount API works.
    #[arg(long, global = true)]
    legacy_mount_api: bool,
    /// How long a client may take to send a request's headers, and then its body (default
    /// 30s); a connection that takes longer is closed. Advanced: the tests shorten it.
    #[arg(long, global = true, hide = true, value_name = "DURATION", value_parser = parse_timeout)]
    read_timeout: Option<Duration>,
    /// Only create volumes whose base is DIR or lies inside it (repeatable; default: any
    /// directory). Paths are compared after resolving symlinks, component by component.
    #[arg(long = "allowed-base", global = true, value_name = "DIR")]
    allowed_bases: Vec<PathBuf>,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(err) => Err(err.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            logging::init();
            match serve(cli.opts) {
                Ok(()) => {
                    info!("exiting");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    error!("{err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        command => {
            logging::init_with_default("warn");
            match admin(&cli.opts.root, command) {
                Ok(()) => ExitCode::SUCCESS,
                // The reader went away (`changes | head`): nothing to say.
                Err(err) if is_broken_pipe(&err) => ExitCode::FAILURE,
                Err(err) => {
                    eprintln!("docker-on-top: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The admin commands: the library does the work, this prints it.
fn admin(root: &Path, command: Command) -> Result<()> {
    let admin = Admin::open(root)?;
    let name = |n: &str| VolumeName::parse(n).context("invalid volume name");
    let mut out = io::BufWriter::new(io::stdout().lock());
    let warn = |warnings: &[String]| {
        for w in warnings {
            eprintln!("docker-on-top: warning: {w}");
        }
    };
    match command {
        Command::Serve => unreachable!("served by main"),
        Command::Ls { json: true } => admin::write_json(&mut out, &admin.list()?)?,
        Command::Ls { json: false } => admin::write_table(&mut out, &admin.list()?)?,
        Command::Inspect { name: n } => admin::write_json(&mut out, &admin.inspect(&name(&n)?)?)?,
        Command::Changes { name: n, json } => {
            let changes = admin.changes(&name(&n)?)?;
            warn(&changes.warnings);
            if json {
                admin::write_json(&mut out, &changes.changes)?;
            } else {
                admin::write_changes(&mut out, &changes.changes)?;
            }
        }
        Command::Recover { name: n, dest } => {
            let done = admin.recover(&name(&n)?, &dest)?;
            warn(&done.warnings);
            let deleted: Vec<Change> = done
                .deleted
                .iter()
                .map(|path| Change {
                    kind: ChangeKind::Deleted,
                    path: path.clone(),
                })
                .collect();
            admin::write_changes(&mut out, &deleted)?;
            for (path, why) in &done.skipped {
                eprintln!("docker-on-top: skipped {}: {why}", path.display());
            }
            eprintln!(
                "recovered {} entries ({}) of volume {n} into {}; {} deleted path(s) listed",
                done.entries,
                admin::human_bytes(done.bytes),
                dest.display(),
                done.deleted.len()
            );
        }
        Command::Export { name: n, output } => {
            let name = name(&n)?;
            let done = match output {
                Some(path) => export_to_file(&admin, &name, &path)?,
                None if io::stdout().is_terminal() => bail!(
                    "refusing to write a tar stream to a terminal: use -o FILE or redirect the output"
                ),
                None => admin.export(&name, &mut out)?,
            };
            warn(&done.warnings);
            for (path, why) in &done.skipped {
                eprintln!("docker-on-top: skipped {}: {why}", path.display());
            }
        }
        Command::Reset { name: n } => {
            let done = admin.reset(&name(&n)?)?;
            warn(&done.warnings);
            eprintln!("volume {n}: changes discarded");
        }
        Command::Commit {
            name: n,
            yes: false,
        } => {
            let changes = admin.changes(&name(&n)?)?;
            warn(&changes.warnings);
            admin::write_changes(&mut out, &changes.changes)?;
            eprintln!(
                "nothing was changed; `docker-on-top commit {n} --yes` applies these {} change(s) to {} and then discards them from the volume",
                changes.changes.len(),
                changes.base.display()
            );
        }
        Command::Commit { name: n, yes: true } => {
            let done = admin.commit(&name(&n)?)?;
            warn(&done.warnings);
            admin::write_changes(&mut out, &done.changes)?;
            for (path, why) in &done.applied.skipped {
                eprintln!("docker-on-top: skipped {}: {why}", path.display());
            }
            eprintln!(
                "volume {n}: {} change(s) applied to {}; the volume now has no changes",
                done.changes.len(),
                done.base.display()
            );
        }
    }
    out.flush()?;
    Ok(())
}

/// Exports into a file, which is removed again if the export fails.
fn export_to_file(admin: &Admin, name: &VolumeName, path: &Path) -> Result<admin::Exported> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    admin
        .export(name, io::BufWriter::new(file))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
        .map_err(Into::into)
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Threads for the driver calls that change state (see `server::run`), which bounds how many
/// run at once; more wait. Calls of one volume wait for each other anyway (its lock), and
/// mounts serialise in the kernel. Idle ones exit after 5 s.
const BLOCKING_THREADS: usize = 16;
/// Stack of every runtime thread: the JSON decoded on them recurses at most 128 levels deep
/// and the driver nowhere deep; only the pages touched count.
const THREAD_STACK: usize = 512 * 1024;

fn serve(opts: Opts) -> Result<()> {
    if let Some(files) = server::raise_fd_limit() {
        log::debug!("may open {files} files");
    }
    let allowed_bases = AllowedBases::new(&opts.allowed_bases)?;
    if !allowed_bases.dirs().is_empty() {
        let dirs: Vec<String> = (allowed_bases.dirs().iter())
            .map(|d| d.display().to_string())
            .collect();
        info!("bases allowed only inside: {}", dirs.join(", "));
    }
    let driver = Driver::open(DriverConfig {
        root: opts.root.clone(),
        legacy_mount_api: opts.legacy_mount_api,
        allowed_bases,
    })
    .with_context(|| format!("cannot open the state directory {}", opts.root.display()))?;
    let driver = Arc::new(driver);

    // This thread accepts connections and serves their requests (see `server::run`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("docker-on-top")
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_stack_size(THREAD_STACK)
        .thread_keep_alive(Duration::from_secs(5))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let stop = stop_signal().context("cannot install the signal handlers")?;
        let listening = server::listen(&opts.socket).context("cannot acquire the plugin socket")?;
        let how = match &listening {
            Listening::Activated(_) => "socket activated",
            Listening::Created { .. } => "created",
        };
        let shown = listening
            .path()
            .unwrap_or_else(|| "an unnamed socket".into());
        let (listener, _socket_file) = listening.into_parts();
        server::notify(NotifyState::Ready);
        driver.start_janitor();
        info!("serving on {} ({how})", shown.display());
        let serve_opts = ServeOptions {
            idle_timeout: opts.idle_timeout,
            read_timeout: opts.read_timeout,
        };
        server::serve(listener, driver.clone(), serve_opts, stop)
            .await
            .context("cannot accept connections")
    });
    runtime.shutdown_timeout(Duration::from_secs(10));
    // Finishes the unmounts that last Unmounts left for after their replies (when no
    // connection still holds the driver).
    drop(driver);
    result
}

/// Completes on SIGTERM or SIGINT. Installed before the service reports ready, so that no
/// early signal kills the process without a clean shutdown.
fn stop_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!("received {name}, stopping");
    })
}
