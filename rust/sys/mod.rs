//! The only code that calls libc: syscalls, ioctls and raw memory access.
//!
//! Everything above this module speaks in safe types ([`Uffd`](uffd::Uffd),
//! [`Memfd`](memfd::Memfd), [`Mapping`](mman::Mapping), [`Pagemap`](pagemap::Pagemap)).
//! Each wrapper turns a C return value into `io::Result` at the call (see
//! [`cvt`]) so the errno is never lost; EINTR is retried in one place
//! ([`retry_eintr`]) and EAGAIN of userfaultfd ioctls in [`uffd`].

pub mod fork;
pub mod inject;
pub mod memfd;
pub mod mman;
pub mod pagemap;
pub mod procmem;
#[cfg(feature = "python")]
pub mod pybuf;
pub mod uffd;

use std::io;
use std::sync::{Mutex, OnceLock};

/// Turn a libc return value (`-1` means failure, errno set) into a `Result`.
pub(crate) fn cvt<T: IsMinusOne>(ret: T) -> io::Result<T> {
    if ret.is_minus_one() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Call `f` until it does not fail with EINTR.
pub(crate) fn retry_eintr<T, F: FnMut() -> io::Result<T>>(mut f: F) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            other => return other,
        }
    }
}

pub(crate) trait IsMinusOne {
    fn is_minus_one(&self) -> bool;
}
macro_rules! impl_minus_one {
    ($($t:ty)*) => {$(impl IsMinusOne for $t { fn is_minus_one(&self) -> bool { *self == -1 } })*};
}
impl_minus_one!(i32 i64 isize);

/// The least a thread of [`in_parts`] takes (starting a thread costs tens of
/// microseconds; copying 1 MiB, a few hundred).
pub const PART_MIN: usize = 1 << 20;

/// Run `part(offset, len)` over consecutive page-aligned parts of `[0, len)` on up to
/// `threads` threads (this one included), each part at least [`PART_MIN`] bytes:
/// for the kernel's big copies (an unmerge's `UFFDIO_COPY`), bound by one core's
/// memory bandwidth and page allocation, which proceed side by side (the kernel
/// takes `mmap_lock` for reading only). Every part is attempted, also
/// when another fails (the caller cannot tell which parts were done: it treats an
/// error as "none"); the error returned prefers one that is not EFAULT, which
/// callers treat as "do it another way".
pub fn in_parts<F>(len: usize, threads: usize, page: usize, part: F) -> io::Result<()>
where
    F: Fn(usize, usize) -> io::Result<()> + Sync,
{
    let parts = threads.min(len / PART_MIN).max(1);
    if parts == 1 {
        return part(0, len);
    }
    let per = (len / page).div_ceil(parts) * page;
    let span = |i: usize| {
        let off = (i * per).min(len);
        (off, per.min(len - off))
    };
    let part = &part;
    let results: Vec<io::Result<()>> = std::thread::scope(|s| {
        let others: Vec<_> = (1..parts)
            .map(|i| {
                let (off, n) = span(i);
                std::thread::Builder::new()
                    .name("ksm-part".into())
                    .spawn_scoped(s, move || part(off, n))
            })
            .collect();
        let mut out = vec![{
            let (off, n) = span(0);
            part(off, n)
        }];
        for (i, h) in others.into_iter().enumerate() {
            out.push(match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a thread of in_parts panicked"))),
                // No thread for this part: done here.
                Err(_) => {
                    let (off, n) = span(i + 1);
                    part(off, n)
                }
            });
        }
        out
    });
    let mut efault = None;
    for r in results {
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => efault = Some(e),
            Err(e) => return Err(e),
        }
    }
    efault.map_or(Ok(()), Err)
}

/// A part of [`map_parts`]' work, until a thread takes it.
type Slot<'a, T, R> = Mutex<Option<(&'a [T], &'a mut [R])>>;

/// Run `work` over consecutive parts of `items`, each with the matching part of
/// `out`, on up to `threads` threads (this one included), each part at least
/// `min_part` items: for work that is only reading and computing (a scan's
/// checksums), which proceeds side by side. The threads are scoped: all have ended
/// when this returns (so none is alive at a `fork()`, which only takes place between
/// scan batches). A part whose thread cannot be started is done here.
///
/// Returns the CPU time the other threads used, in nanoseconds: the caller's
/// [`thread_cpu_ns`] does not see it, and the scanner's CPU must be charged in full
/// (the scan-time advisor, statistics).
pub fn map_parts<T, R, F>(
    items: &[T],
    out: &mut [R],
    threads: usize,
    min_part: usize,
    work: F,
) -> u64
where
    T: Sync,
    R: Send,
    F: Fn(&[T], &mut [R]) + Sync,
{
    assert_eq!(items.len(), out.len(), "one output per item");
    let parts = threads.min(items.len() / min_part.max(1)).max(1);
    if parts == 1 {
        work(items, out);
        return 0;
    }
    let per = items.len().div_ceil(parts);
    // Each part in a slot, taken by the thread that does it (or by this one, should
    // its thread fail to start: `spawn_scoped` then drops the closure unrun).
    let slots: Vec<Slot<'_, T, R>> = items
        .chunks(per)
        .zip(out.chunks_mut(per))
        .map(|p| Mutex::new(Some(p)))
        .collect();
    let take = |slot: &Slot<'_, T, R>| {
        if let Some((i, o)) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            work(i, o);
        }
    };
    std::thread::scope(|s| {
        let others: Vec<_> = slots[1..]
            .iter()
            .map(|slot| {
                std::thread::Builder::new()
                    .name("ksm-hash".into())
                    .spawn_scoped(s, move || {
                        take(slot);
                        thread_cpu_ns()
                    })
            })
            .collect();
        take(&slots[0]);
        let mut cpu = 0;
        for (h, slot) in others.into_iter().zip(&slots[1..]) {
            match h.map(|h| h.join()) {
                Ok(Ok(ns)) => cpu += ns,
                Ok(Err(panic)) => std::panic::resume_unwind(panic),
                Err(_) => take(slot),
            }
        }
        cpu
    })
}

/// The system page size (`sysconf(_SC_PAGESIZE)`), read once.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(v).ok().filter(|&p| p > 0).unwrap_or(4096)
    })
}

/// The process id (changes in a forked child, which is how the child notices it).
pub fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() }
}

/// CPU time the calling thread has used, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`),
/// for the scan-time advisor; 0 if the clock cannot be read.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux has.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_parts_does_every_item_once_and_counts_the_other_threads_cpu() {
        let items: Vec<u64> = (0..10_000).collect();
        let mut out = vec![0u64; items.len()];
        let cpu = map_parts(&items, &mut out, 4, 1000, |i, o| {
            for (x, y) in i.iter().zip(o) {
                // Enough work that each thread's CPU clock moves.
                *y = (0..2000u64).fold(*x, |a, b| a.wrapping_mul(31).wrapping_add(b));
            }
        });
        for (x, y) in items.iter().zip(&out) {
            assert_eq!(
                *y,
                (0..2000u64).fold(*x, |a, b| a.wrapping_mul(31).wrapping_add(b))
            );
        }
        assert!(cpu > 0, "three other threads did a part each");
        // Too few items for two parts of at least `min_part`: all done here.
        let mut few = vec![0u64; 10];
        let cpu = map_parts(&items[..10], &mut few, 4, 1000, |i, o| o.copy_from_slice(i));
        assert_eq!((cpu, &few[..]), (0, &items[..10]));
    }

    #[test]
    #[should_panic(expected = "a part panicked")]
    fn a_panic_in_a_part_reaches_the_caller() {
        let items = [0u8; 8];
        let mut out = [0u8; 8];
        map_parts(&items, &mut out, 2, 1, |i, _| {
            if i.as_ptr() != items.as_ptr() {
                panic!("a part panicked");
            }
        });
    }
}
