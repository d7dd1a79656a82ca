//! Log output: to journald (priority-prefixed lines) under systemd, to stderr with
//! timestamps otherwise; and holding back the lines of a request until it is answered.
//!
//! Only sets up the `log` facade; it must not decide what is logged or at which level.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};

use log::Level;

/// Installs the logger. The filter comes from `RUST_LOG` (default `info`). When stderr is the
/// journal stream systemd announced in `JOURNAL_STREAM`, each line starts with its syslog
/// priority (`<3>` error, `<4>` warn, `<6>` info, `<7>` debug) and has no timestamp, which
/// journald adds itself.
pub fn init() {
    init_with_default("info");
}

/// [`init`] with another filter than `info` when `RUST_LOG` is not set.
pub fn init_with_default(filter: &str) {
    let env = env_logger::Env::default().default_filter_or(filter);
    let mut builder = env_logger::Builder::from_env(env);
    builder.target(env_logger::Target::Pipe(Box::new(Output)));
    if stderr_is_journal() {
        builder
            .write_style(env_logger::WriteStyle::Never)
            .format(|buf, record| writeln!(buf, "<{}>{}", priority(record.level()), record.args()));
    } else {
        // A pipe target is never coloured by itself: colour as env_logger would on stderr.
        let style = std::env::var("RUST_LOG_STYLE");
        if style.is_err()
            && std::env::var_os("NO_COLOR").is_none()
            && std::io::stderr().is_terminal()
        {
            builder.write_style(env_logger::WriteStyle::Always);
        }
        builder.format(|buf, record| {
            let level = record.level();
            let style = buf.default_level_style(level);
            writeln!(
                buf,
                "{} {style}{level:<5}{style:#} {}",
                buf.timestamp_seconds(),
                record.args()
            )
        });
    }
    // A second call (tests) keeps the first logger.
    let _ = builder.try_init();
}

thread_local! {
    /// The lines this thread holds back ([`Held`]), or `None` when it writes them at once.
    static HELD: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Where log lines go: stderr, or the thread's held lines while a [`Held`] is open.
struct Output;

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let held = HELD.with_borrow_mut(|held| held.as_mut().map(|h| h.extend_from_slice(buf)));
        match held {
            Some(()) => Ok(buf.len()),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Holds back the log lines this thread writes until [`Held::release`], so that a request
/// is answered before its lines are written: writing one costs a request ~15 µs (a write to
/// the journal's socket also wakes journald, dearer still on a VM), and dockerd waits for the
/// answer, not for the log. Lines not yet released when the `Held` is dropped are written
/// then.
pub struct Held(());

impl Held {
    /// Starts holding back this thread's lines (none are held already).
    pub fn begin() -> Held {
        HELD.with_borrow_mut(|held| *held = Some(Vec::new()));
        Held(())
    }

    /// Stops holding back; returns the lines held, for [`write_lines`].
    pub fn release(self) -> Vec<u8> {
        let lines = HELD.with_borrow_mut(Option::take).unwrap_or_default();
        std::mem::forget(self);
        lines
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        write_lines(&HELD.with_borrow_mut(Option::take).unwrap_or_default());
    }
}

/// Writes lines held back by a [`Held`].
pub fn write_lines(lines: &[u8]) {
    if !lines.is_empty() {
        let _ = std::io::stderr().write_all(lines);
    }
}

/// The syslog priority journald reads from a `<N>` line prefix.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// `JOURNAL_STREAM` is `DEVICE:INODE` of the journal's stream; it is inherited by children
/// whose stderr may go elsewhere, so compare it with what stderr really is.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    rustix::fs::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_lines_wait_for_release_and_go_on_drop() {
        HELD.with_borrow_mut(|held| assert!(held.is_none()));
        let held = Held::begin();
        Output.write_all(b"one\n").unwrap();
        Output.write_all(b"two\n").unwrap();
        assert_eq!(held.release(), b"one\ntwo\n");
        HELD.with_borrow_mut(|held| assert!(held.is_none(), "released: written at once again"));
        let held = Held::begin();
        Output.write_all(b"three\n").unwrap();
        drop(held);
        HELD.with_borrow_mut(|held| assert!(held.is_none(), "dropped: written"));
    }

    #[test]
    fn priorities_match_syslog() {
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Debug), 7);
        assert_eq!(priority(Level::Trace), 7);
    }
}
