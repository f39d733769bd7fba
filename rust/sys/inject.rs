//! Fault injection for tests: make chosen system calls fail with a chosen
//! errno, every `n`-th call, so that tests can check that no write is
//! lost, no page corrupted and no frame leaked when the kernel says no halfway.
//! Off unless a test turns it on (`ksm._ksm._inject`); one relaxed atomic load
//! per guarded call otherwise.

#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// The guarded calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// `mmap` of a frame over a page (the merge step).
    MapFixed,
    /// `mremap` of a private copy over a merged page (the unmerge step).
    MoveOver,
    /// `mmap` of scratch memory for private copies.
    Anonymous,
    /// `UFFDIO_REGISTER`.
    Register,
    /// `UFFDIO_WRITEPROTECT` (protect and unprotect).
    WriteProtect,
    /// `UFFDIO_CONTINUE` giving a newly merged mapping its PTEs.
    Continue,
    /// Not a failure: a test's stand-in for the application, which discards
    /// (`MADV_DONTNEED`) a newly merged mapping just before that `UFFDIO_CONTINUE`.
    DiscardBeforeContinue,
    /// `fallocate(PUNCH_HOLE)` of a freed frame.
    Punch,
    /// Reading memory ksm does not own.
    ReadForeign,
    /// `sendmsg` on a merge domain's socket.
    Send,
    /// `recvmsg` on a merge domain's socket.
    Recv,
    /// Sealing a segment a member publishes to its domain.
    Seal,
    /// Mapping a segment received from the domain.
    MapSegment,
}

pub const POINTS: &[(&str, Point)] = &[
    ("map_fixed", Point::MapFixed),
    ("move_over", Point::MoveOver),
    ("anonymous", Point::Anonymous),
    ("register", Point::Register),
    ("writeprotect", Point::WriteProtect),
    ("continue", Point::Continue),
    ("discard_before_continue", Point::DiscardBeforeContinue),
    ("punch", Point::Punch),
    ("read_foreign", Point::ReadForeign),
    ("send", Point::Send),
    ("recv", Point::Recv),
    ("seal", Point::Seal),
    ("map_segment", Point::MapSegment),
];

const N: usize = 13;
static EVERY: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static ERRNO: [AtomicI32; N] = [const { AtomicI32::new(0) }; N];
static CALLS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static FIRED: AtomicU64 = AtomicU64::new(0);

/// Make every `every`-th call at `p` fail with `errno` (0 turns it off).
pub fn set(p: Point, every: u64, errno: i32) {
    let i = p as usize;
    ERRNO[i].store(errno, Ordering::Relaxed);
    CALLS[i].store(0, Ordering::Relaxed);
    EVERY[i].store(every, Ordering::Relaxed);
}

/// Failures injected so far.
pub fn fired() -> u64 {
    FIRED.load(Ordering::Relaxed)
}

/// Called before the real call: the injected error, if this call is one.
pub fn check(p: Point) -> io::Result<()> {
    let i = p as usize;
    let every = EVERY[i].load(Ordering::Relaxed);
    if every == 0 {
        return Ok(());
    }
    if (CALLS[i].fetch_add(1, Ordering::Relaxed) + 1) % every == 0 {
        FIRED.fetch_add(1, Ordering::Relaxed);
        return Err(io::Error::from_raw_os_error(
            ERRNO[i].load(Ordering::Relaxed),
        ));
    }
    Ok(())
}
