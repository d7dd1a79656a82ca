//! The `docker-on-top` daemon: parses the command line, opens the driver, acquires the plugin
//! socket and serves until a signal (or the idle timeout) arrives.
//!
//! Wiring only: anything worth testing belongs in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use docker_on_top::driver::{Driver, DriverConfig};
use docker_on_top::logging;
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
    logging::init();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => match serve(cli.opts) {
            Ok(()) => {
                info!("exiting");
                ExitCode::SUCCESS
            }
            Err(err) => {
                error!("{err:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(opts: Opts) -> Result<()> {
    let driver = Driver::open(DriverConfig {
        root: opts.root.clone(),
        legacy_mount_api: opts.legacy_mount_api,
    })
    .with_context(|| format!("cannot open the state directory {}", opts.root.display()))?;
    let driver = Arc::new(driver);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("docker-on-top")
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
        };
        server::serve(listener, driver.clone(), serve_opts, stop)
            .await
            .context("cannot accept connections")
    });
    // Requests still running in the driver after the drain get a little longer to finish.
    runtime.shutdown_timeout(Duration::from_secs(10));
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
