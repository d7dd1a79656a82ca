//! The `docker-on-top` daemon: parses the command line, opens the driver, acquires the plugin
//! socket and serves until a signal (or the idle timeout) arrives. The admin subcommands
//! (`ls`, `inspect`, `changes`, `recover`, `export`, `reset`, `commit`) print what
//! `docker_on_top::admin` does; any failure is one line on stderr and exit status 1, or 3
//! when the volume does not exist (clap's usage errors are 2). The hidden `generate`
//! subcommand writes the man pages and shell completions (for packaging: `make generated`).
//!
//! Wiring only: anything worth testing belongs in the library.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use docker_on_top::admin::{self, Admin, AdminError};
use docker_on_top::driver::{Driver, DriverConfig, DriverError};
use docker_on_top::logging;
use docker_on_top::names::VolumeName;
use docker_on_top::options::{AllowedBases, HostRoot};
use docker_on_top::server::{self, Listening, ServeOptions};
use log::{error, info};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

/// Exit status of a failure.
const EXIT_FAILURE: u8 = 1;
/// Exit status when the named volume does not exist.
const EXIT_NO_SUCH_VOLUME: u8 = 3;

/// `--help` of every command ends with this, and the man pages have it as EXIT STATUS.
const EXIT_STATUS: &str = "\
Exit status:
  0  success
  1  failure (one line on stderr says why)
  2  usage error (unknown command or option, missing argument)
  3  no such volume";

/// Docker volume plugin: a copy-on-write (overlayfs) view of a host directory.
///
/// With no command, serves the plugin socket: `docker-on-top [OPTIONS]` is
/// `docker-on-top serve [OPTIONS]`. The other commands inspect and manage the volumes in the
/// state directory, with or without the daemon running.
#[derive(Debug, Parser)]
#[command(name = "docker-on-top", version, about, after_long_help = EXIT_STATUS)]
struct Cli {
    /// The state directory.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "/var/lib/docker-on-top"
    )]
    root: PathBuf,
    /// `serve`'s options, for `docker-on-top` with no command (hidden here: see `serve --help`).
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the plugin socket (the default command).
    Serve(ServeArgs),
    /// List every volume: base, volatile, mounted, active mounts, size of its changes.
    Ls {
        /// JSON (an array of `inspect` objects) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one volume, as JSON (the default and only format; `--json` is accepted).
    Inspect {
        /// The volume.
        name: String,
        /// JSON (already the default).
        #[arg(long)]
        json: bool,
    },
    /// What a volume changed, one line per path: A added, C changed, D deleted.
    Changes {
        /// The volume.
        name: String,
        /// JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Copy a volume's added and changed entries into DEST (new or empty).
    Recover {
        /// The volume.
        name: String,
        /// Where to copy them: a new directory (its parent must exist) or an empty one.
        dest: PathBuf,
        #[command(flatten)]
        verbose: Verbose,
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
        #[command(flatten)]
        verbose: Verbose,
    },
    /// Apply the changes of a volume that is not mounted to its base, then reset it.
    Commit {
        /// The volume.
        name: String,
        /// Really do it; without it, only list what would change.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        verbose: Verbose,
    },
    /// Write the man pages or the shell completions into DIR (for packaging).
    #[command(hide = true)]
    Generate {
        what: Generated,
        /// An existing directory.
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Generated {
    /// docker-on-top.8 and docker-on-top-COMMAND.8.
    Man,
    /// docker-on-top.bash, _docker-on-top (zsh) and docker-on-top.fish.
    Completions,
}

#[derive(Debug, Args)]
struct Verbose {
    /// One line per action taken, then the summary.
    #[arg(short, long)]
    verbose: bool,
}

/// The daemon's options.
#[derive(Debug, Args)]
struct ServeArgs {
    /// The plugin socket to create (ignored when systemd passes one).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/docker/plugins/docker-on-top.sock"
    )]
    socket: PathBuf,
    /// Exit once no request has arrived for this long (e.g. 30s, 5min).
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    idle_timeout: Option<Duration>,
    /// Mount with legacy mount(2) even where the new mount API works.
    #[arg(long)]
    legacy_mount_api: bool,
    /// How long a client may take to send a request's headers, and then its body (default
    /// 30s); a connection that takes longer is closed. Advanced: the tests shorten it.
    #[arg(long, hide = true, value_name = "DURATION", value_parser = parse_timeout)]
    read_timeout: Option<Duration>,
    /// Only create volumes whose base is DIR or lies inside it (repeatable; default: any
    /// directory, or the colon-separated list in DOCKER_ON_TOP_ALLOWED_BASES). Paths are
    /// compared after resolving symlinks, component by component.
    #[arg(long = "allowed-base", value_name = "DIR")]
    allowed_bases: Vec<PathBuf>,
    /// The host's / is mounted at DIR (a managed plugin's view): bases are host paths, looked
    /// up under DIR as if it were /.
    #[arg(long, value_name = "DIR")]
    host_root: Option<PathBuf>,
    /// Mount each volume at DIR/NAME instead of in its directory under --root (a managed
    /// plugin's propagated mount).
    #[arg(long, value_name = "DIR")]
    mount_dir: Option<PathBuf>,
}

/// `docker plugin set NAME DOCKER_ON_TOP_ALLOWED_BASES=/a:/b`: the managed plugin's (and
/// anyone's) allowed bases when no `--allowed-base` is given.
const ALLOWED_BASES_ENV: &str = "DOCKER_ON_TOP_ALLOWED_BASES";

/// What `serve` runs with.
#[derive(Debug)]
struct Opts {
    socket: PathBuf,
    root: PathBuf,
    idle_timeout: Option<Duration>,
    legacy_mount_api: bool,
    read_timeout: Option<Duration>,
    allowed_bases: Vec<PathBuf>,
    /// Where `allowed_bases` came from, for messages: the option or the environment.
    allowed_bases_from: &'static str,
    host_root: Option<PathBuf>,
    mount_dir: Option<PathBuf>,
}

/// The longest timeout taken: a clock reading plus a longer one would overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn parse_timeout(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) if d > MAX_TIMEOUT => Err("must be at most 100 years".into()),
        Ok(d) => Ok(d),
        Err(err) => Err(err.to_string()),
    }
}

/// The command line, as `--help`, the man pages and the completions show it: the top level's
/// copy of the serve options is hidden (documented once, under `serve`), and every command's
/// `--help` ends with the exit statuses.
fn cli() -> clap::Command {
    let serve_ids: Vec<String> = (ServeArgs::augment_args(clap::Command::new("serve")))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    Cli::command()
        .mut_args(|a| {
            if serve_ids.iter().any(|id| id == a.get_id()) {
                a.hide(true)
            } else {
                a
            }
        })
        .mut_subcommands(|c| c.after_long_help(EXIT_STATUS))
}

fn main() -> ExitCode {
    let mut cmd = cli();
    let matches = cmd.get_matches_mut();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    // A serve option before another command is a usage error, not silently ignored.
    if let Some((sub, _)) = matches.subcommand() {
        let args: Vec<(String, String)> = (ServeArgs::augment_args(clap::Command::new("serve")))
            .get_arguments()
            .filter_map(|a| Some((a.get_id().to_string(), a.get_long()?.to_owned())))
            .collect();
        for (id, long) in args {
            if matches.value_source(&id) == Some(clap::parser::ValueSource::CommandLine) {
                cmd.error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "--{long} goes after `serve` (`docker-on-top serve --{long} ...`), not before `{sub}`"
                    ),
                )
                .exit();
            }
        }
    }
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));
    match command {
        Command::Serve(args) => {
            logging::init();
            let (allowed_bases, allowed_bases_from) = if args.allowed_bases.is_empty() {
                let listed = std::env::var_os(ALLOWED_BASES_ENV).unwrap_or_default();
                let dirs = std::env::split_paths(&listed)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect();
                (dirs, ALLOWED_BASES_ENV)
            } else {
                (args.allowed_bases, "--allowed-base")
            };
            let opts = Opts {
                socket: args.socket,
                root: cli.root,
                idle_timeout: args.idle_timeout,
                legacy_mount_api: args.legacy_mount_api,
                read_timeout: args.read_timeout,
                allowed_bases,
                allowed_bases_from,
                host_root: args.host_root,
                mount_dir: args.mount_dir,
            };
            match serve(opts) {
                Ok(()) => {
                    info!("exiting");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    error!("{err:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Generate { what, dir } => match generate(what, &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("docker-on-top: {err:#}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        command => {
            logging::init_with_default("warn");
            // Reading a volume holds a descriptor for each directory level on the way down
            // (two in a tree copied or compared), and containers may nest them deep.
            server::raise_fd_limit();
            match admin(&cli.root, command) {
                Ok(()) => ExitCode::SUCCESS,
                // The reader went away (`changes | head`): nothing to say.
                Err(err) if is_broken_pipe(&err) => ExitCode::from(EXIT_FAILURE),
                Err(err) => {
                    eprintln!("docker-on-top: {err:#}");
                    ExitCode::from(exit_status(&err))
                }
            }
        }
    }
}

/// 3 when the volume named does not exist, else 1.
fn exit_status(err: &anyhow::Error) -> u8 {
    let missing = err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<AdminError>(),
            Some(AdminError::Driver(DriverError::NoSuchVolume(_)))
        ) || matches!(
            cause.downcast_ref::<DriverError>(),
            Some(DriverError::NoSuchVolume(_))
        )
    });
    if missing {
        EXIT_NO_SUCH_VOLUME
    } else {
        EXIT_FAILURE
    }
}

/// The admin commands: the library does the work, this prints it. Reading commands print
/// what they read; changing ones a one-line summary on stdout (after one line per action with
/// `-v`), warnings and skipped paths on stderr.
fn admin(root: &Path, command: Command) -> Result<()> {
    let admin = Admin::open(root)?;
    let name = |n: &str| VolumeName::parse(n).context("invalid volume name");
    let mut out = io::BufWriter::new(io::stdout().lock());
    let warn = |warnings: &[String]| {
        for w in warnings {
            eprintln!("docker-on-top: warning: {w}");
        }
    };
    let skipped = |skipped: &[(PathBuf, &str)]| {
        for (path, why) in skipped {
            eprintln!("docker-on-top: skipped {}: {why}", path.display());
        }
    };
    match command {
        Command::Serve(_) | Command::Generate { .. } => unreachable!("run by main"),
        Command::Ls { json: true } => admin::write_json(&mut out, &admin.list()?)?,
        Command::Ls { json: false } => admin::write_table(&mut out, &admin.list()?)?,
        Command::Inspect { name: n, json: _ } => {
            admin::write_json(&mut out, &admin.inspect(&name(&n)?)?)?
        }
        Command::Changes { name: n, json } => {
            let changes = admin.changes(&name(&n)?)?;
            warn(&changes.warnings);
            if json {
                admin::write_json(&mut out, &changes.changes)?;
            } else {
                admin::write_changes(&mut out, &changes.changes)?;
            }
        }
        Command::Recover {
            name: n,
            dest,
            verbose,
        } => {
            let done = admin.recover(&name(&n)?, &dest)?;
            warn(&done.warnings);
            skipped(&done.skipped);
            if verbose.verbose {
                for path in &done.copied {
                    writeln!(out, "copied {}", path.display())?;
                }
                for path in &done.deleted {
                    writeln!(out, "not copied, deleted in the volume: {}", path.display())?;
                }
            }
            writeln!(
                out,
                "volume {n}: recovered {} entries ({}) into {}; {} deleted path(s) not recoverable{}",
                done.entries,
                admin::human_bytes(done.bytes),
                dest.display(),
                done.deleted.len(),
                if done.deleted.is_empty() || verbose.verbose {
                    ""
                } else {
                    " (-v lists them)"
                }
            )?;
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
            skipped(&done.skipped);
        }
        Command::Reset { name: n, verbose } => {
            let vol = name(&n)?;
            let dir = admin.driver().root().volume(&vol);
            // A sized volume's changes go with its image, and a fresh image takes its place.
            let (changes, made) = if dir.sized() {
                (dir.image(), "made a fresh image at")
            } else {
                (dir.upper(), "made anew, empty:")
            };
            let done = admin.reset(&vol)?;
            warn(&done.warnings);
            if verbose.verbose {
                if let Some(trashed) = &done.trashed {
                    writeln!(out, "moved {} to {}", changes.display(), trashed.display())?;
                }
                writeln!(out, "{made} {}", changes.display())?;
                if let Some(trashed) = done.trashed.as_ref().filter(|_| done.warnings.is_empty()) {
                    writeln!(out, "deleted {}", trashed.display())?;
                }
            }
            writeln!(out, "volume {n}: changes discarded")?;
        }
        Command::Commit {
            name: n,
            yes: false,
            verbose: _,
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
        Command::Commit {
            name: n,
            yes: true,
            verbose,
        } => {
            let done = admin.commit(&name(&n)?)?;
            warn(&done.warnings);
            skipped(&done.applied.skipped);
            if verbose.verbose {
                admin::write_changes(&mut out, &done.changes)?;
            }
            writeln!(
                out,
                "volume {n}: {} change(s) applied to {} ({} written, {} deleted, {} skipped); the volume now has no changes",
                done.changes.len(),
                done.base.display(),
                done.applied.written,
                done.applied.deleted,
                done.applied.skipped.len()
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `generate man DIR`: a page for the program and one per (visible) command, section 8.
/// `generate completions DIR`: bash, zsh and fish.
fn generate(what: Generated, dir: &Path) -> Result<()> {
    let write = |file: &str, render: &dyn Fn(&mut dyn Write) -> io::Result<()>| -> Result<()> {
        let path = dir.join(file);
        let mut f = io::BufWriter::new(
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
        );
        render(&mut f)
            .and_then(|()| f.flush())
            .with_context(|| format!("cannot write {}", path.display()))
    };
    let mut cmd = cli().disable_help_subcommand(true);
    cmd.build();
    match what {
        Generated::Man => {
            let pages = std::iter::once((cmd.clone(), None)).chain(
                (cmd.get_subcommands())
                    .filter(|c| !c.is_hide_set())
                    .map(|c| (c.clone(), Some(c.get_name().to_owned()))),
            );
            for (page, sub) in pages {
                let title = match &sub {
                    Some(s) => format!("docker-on-top-{s}"),
                    None => "docker-on-top".into(),
                };
                write(&format!("{title}.8"), &|w| {
                    man_page(&page, &title, sub.is_some(), w)
                })?;
            }
        }
        Generated::Completions => {
            use clap_complete::Shell;
            for (shell, file) in [
                (Shell::Bash, "docker-on-top.bash"),
                (Shell::Zsh, "_docker-on-top"),
                (Shell::Fish, "docker-on-top.fish"),
            ] {
                write(file, &|w| {
                    let mut script = Vec::new();
                    clap_complete::generate(
                        shell,
                        &mut visible(&cmd),
                        "docker-on-top",
                        &mut script,
                    );
                    if shell == Shell::Bash {
                        // clap_complete names the subcommands' cases of a hyphenated binary
                        // in another spelling than the one it looks them up by (clap-rs/clap
                        // #6421): without this, nothing after a subcommand completes.
                        let script = String::from_utf8_lossy(&script)
                            .replace("docker__subcmd__on__subcmd__top", "docker__on__top");
                        return w.write_all(script.as_bytes());
                    }
                    w.write_all(&script)
                })?;
            }
        }
    }
    Ok(())
}

/// `cmd` (built) without its hidden arguments and subcommands, for the completions:
/// clap_complete offers hidden items too (clap-rs/clap#1335), and clap cannot remove any.
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut shown = clap::Command::new(cmd.get_name().to_owned())
        // The built command's own help and version flags are among its arguments.
        .disable_help_flag(true)
        .disable_version_flag(true)
        .disable_help_subcommand(true);
    if let Some(about) = cmd.get_about() {
        shown = shown.about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        shown = shown.version(version.to_owned());
    }
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        shown = shown.arg(arg.clone());
    }
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        shown = shown.subcommand(visible(sub));
    }
    shown
}

/// One man page: clap_mangen's sections, then EXIT STATUS and SEE ALSO.
fn man_page(cmd: &clap::Command, title: &str, sub: bool, out: &mut dyn Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone())
        .title(title.to_uppercase())
        .section("8")
        .manual("System Administration")
        .source(format!("docker-on-top {}", env!("CARGO_PKG_VERSION")));
    let mut page = Vec::new();
    let w = &mut page;
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    if cmd.get_subcommands().any(|c| !c.is_hide_set()) {
        man.render_subcommands_section(w)?;
    }
    writeln!(w, ".SH \"EXIT STATUS\"")?;
    for line in EXIT_STATUS.lines().skip(1) {
        let (code, what) = line.trim().split_once("  ").unwrap_or(("", line));
        writeln!(w, ".TP\n\\fB{code}\\fR\n{}", what.trim())?;
    }
    writeln!(w, ".SH \"SEE ALSO\"")?;
    if sub {
        writeln!(w, "\\fBdocker-on-top\\fR(8)")?;
    } else {
        // The package's path; `make install` writes its DOCDIR instead.
        writeln!(
            w,
            "\\fBdocker-volume-create\\fR(1), \\fBpodman-volume-create\\fR(1), \
             /usr/share/doc/docker-on-top/README.md"
        )?;
    }
    // Each section came with roff's preamble (the apostrophe string `Aq`): only the first stays.
    let text = String::from_utf8_lossy(&page);
    let mut seen = Vec::new();
    for line in text.lines() {
        if line.ends_with(".ds Aq \\(aq") || line.ends_with(".ds Aq '") {
            if seen.contains(&line) {
                continue;
            }
            seen.push(line);
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Exports into a file, opened once the volume is known to exist. A file made here is removed
/// again if the export fails; one that was there already (a file being replaced, a device such
/// as `/dev/null`, a FIFO) is written into and never removed.
fn export_to_file(admin: &Admin, name: &VolumeName, path: &Path) -> Result<admin::Exported> {
    admin.driver().path(name)?;
    let cannot = || format!("cannot open {}", path.display());
    let (file, made) = match File::create_new(path) {
        Ok(file) => (file, true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let regular = std::fs::metadata(path).with_context(cannot)?.is_file();
            let file = File::options()
                .write(true)
                .truncate(regular)
                .open(path)
                .with_context(cannot)?;
            (file, false)
        }
        Err(e) => return Err(e).with_context(cannot),
    };
    admin
        .export(name, io::BufWriter::new(file))
        .inspect_err(|_| {
            if made {
                let _ = std::fs::remove_file(path);
            }
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
    let host_root = match &opts.host_root {
        Some(dir) => HostRoot::at(dir)
            .with_context(|| format!("cannot use --host-root {}", dir.display()))?,
        None => HostRoot::default(),
    };
    let allowed_bases = AllowedBases::new(&opts.allowed_bases, &host_root)
        .with_context(|| format!("cannot use {}", opts.allowed_bases_from))?;
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
        host_root,
        mount_dir: opts.mount_dir.clone(),
    })
    .with_context(|| format!("cannot open the state directory {}", opts.root.display()))?;
    let driver = Arc::new(driver);
    // A Mount that dockerd cannot see stops the daemon (see `Driver::on_cut_off`).
    let (cut_tx, mut cut_rx) = tokio::sync::watch::channel(false);
    let cut_off = cut_rx.clone();
    driver.on_cut_off(move || {
        cut_tx.send_replace(true);
    });

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
        let (signalled, hurry) = stop_signals().context("cannot install the signal handlers")?;
        let stop = async move {
            tokio::select! {
                () = signalled => {}
                _ = cut_rx.wait_for(|&cut| cut) => {}
            }
        };
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
        server::serve(listener, driver.clone(), serve_opts, stop, hurry)
            .await
            .context("cannot accept connections")
    });
    // Calls still running on the driver (a Mount waiting for a volume's lock, say) get this
    // long, and are then cut short as a crash would cut them: the next start recovers.
    let started = Instant::now();
    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
    if started.elapsed() >= SHUTDOWN_TIMEOUT {
        log::warn!(
            "calls on the driver still running after {} were cut short",
            humantime::format_duration(SHUTDOWN_TIMEOUT)
        );
    }
    if let Some(dir) = opts.mount_dir.as_deref().filter(|_| *cut_off.borrow()) {
        result?;
        bail!(
            "stopped because dockerd no longer sees what is mounted in {}: dockerd starts the \
             plugin again (if it does not, `docker plugin disable -f` and `docker plugin enable` it)",
            dir.display()
        );
    }
    result
}

/// How long a stop waits for the calls still running on the driver once the connections are
/// done with (or given up on).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The first future completes on SIGTERM or SIGINT, the second on the signal after it (a
/// second Ctrl-C, a second `systemctl kill`): stop, then stop waiting for clients. Installed
/// before the service reports ready, so that no early signal kills the process without a
/// clean shutdown.
fn stop_signals() -> std::io::Result<(impl Future<Output = ()>, impl Future<Output = ()>)> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (count_tx, count_rx) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            let count = *count_tx.borrow() + 1;
            if count == 1 {
                info!("received {name}, stopping");
            }
            if count_tx.send(count).is_err() {
                break;
            }
        }
    });
    let after = |n: u32| {
        let mut rx = count_rx.clone();
        async move {
            // An error: the counter is gone with the runtime, and no signal will come.
            if rx.wait_for(|&count| count >= n).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    Ok((after(1), after(2)))
}
