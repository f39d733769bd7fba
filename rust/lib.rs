//! ksm: Kernel Samepage Merging rebuilt in userspace.
//!
//! A process advises memory with [`Engine::madvise`](daemon::Engine::madvise);
//! the `ksmd` thread (or [`scan`](daemon::Engine::scan)) finds pages with the
//! same bytes and maps them onto one frame of a memfd, privately, so that the
//! kernel's own copy-on-write gives a writer its copy back. Userfaultfd
//! write-protection closes the window between compare and remap. See
//! docs/design.md for the mechanism, docs/kernel-contract.md for the contract.
//!
//! Layers (only `sys` calls libc; only `py` uses PyO3):
//! `sys` → `pool`, `region` → `scan` (the algorithm, pure over [`scan::Mem`])
//! → `os` (the real `Mem`) → `daemon` (engine, threads, fork) → `py`.

pub mod daemon;
pub mod domain;
pub mod error;
pub mod os;
pub mod pool;
#[cfg(feature = "python")]
mod py;
pub mod region;
pub mod scan;
pub mod stats;
pub mod sys;
#[cfg(test)]
mod testing;

pub use daemon::Engine;
pub use error::{Error, Result};
