//! docker-on-top: a Docker volume plugin that gives containers a copy-on-write (overlayfs)
//! view of a host directory.
//!
//! Layers, outermost first: [`server`] and [`wire`] speak Docker's plugin protocol and know
//! nothing of files; [`driver`] owns every invariant of the on-disk state; [`sys`] is the small
//! OS boundary (mounts) behind a trait. [`admin`] holds the admin commands (`ls`, `changes`,
//! `recover`, `export`, `reset`, `commit`), which work on the volumes through the driver.

// First: `failpoint!` is used by the modules below.
#[macro_use]
pub mod failpoint;

pub mod admin;
pub mod driver;
pub mod janitor;
pub mod logging;
pub mod names;
pub mod options;
pub mod server;
pub mod store;
pub mod sys;
pub mod wire;

/// An error and its chain of causes as one line: `outer: cause: root cause`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
