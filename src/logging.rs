//! Log output: to journald (priority-prefixed lines) under systemd, to stderr with
//! timestamps otherwise.
//!
//! Only sets up the `log` facade; it must not decide what is logged or at which level.

use std::io::Write;

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
    if stderr_is_journal() {
        builder
            .write_style(env_logger::WriteStyle::Never)
            .format(|buf, record| writeln!(buf, "<{}>{}", priority(record.level()), record.args()));
    } else {
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
    fn priorities_match_syslog() {
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Debug), 7);
        assert_eq!(priority(Level::Trace), 7);
    }
}
