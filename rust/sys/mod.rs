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
#[cfg(feature = "python")]
pub mod npalloc;
pub mod pagemap;
pub mod procmem;
#[cfg(feature = "python")]
pub mod pybuf;
pub mod uffd;
pub mod unix;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// A piece of [`map_parts`]' work, until a thread takes it.
type Slot<'a, T, R> = Mutex<Option<(&'a [T], &'a mut [R])>>;

/// Items [`map_parts`] hands a thread at a time.
pub const MAP_PIECE: usize = 64;

/// Run `work` over `items`, each piece of them with the matching piece of `out`, on
/// up to `threads` threads (this one included), if each can have at least
/// `min_part` items, each thread with scratch state of its own made by `scratch`:
/// for work that is only reading and computing (a scan's checksums), which
/// proceeds side by side. The threads are scoped: all have ended
/// when this returns (so none is alive at a `fork()`, which only takes place between
/// scan batches).
///
/// Pieces of [`MAP_PIECE`] items are handed out one at a time, so that a thread
/// that starts late (a busy core; starting one takes 30–140 µs here) takes fewer
/// instead of keeping the others waiting, and one that cannot be started takes none.
///
/// Returns what the other threads did (see [`Helped`]).
pub fn map_parts<T, R, S, F>(
    items: &[T],
    out: &mut [R],
    (threads, min_part): (usize, usize),
    scratch: impl Fn() -> S + Sync,
    work: F,
) -> Helped
where
    T: Sync,
    R: Send,
    F: Fn(&mut S, &[T], &mut [R]) + Sync,
{
    assert_eq!(items.len(), out.len(), "one output per item");
    let parts = threads.min(items.len() / min_part.max(1)).max(1);
    if parts == 1 {
        work(&mut scratch(), items, out);
        return Helped::default();
    }
    let pieces: Vec<Slot<'_, T, R>> = items
        .chunks(MAP_PIECE)
        .zip(out.chunks_mut(MAP_PIECE))
        .map(|p| Mutex::new(Some(p)))
        .collect();
    let next = AtomicUsize::new(0);
    // Returns how many pieces this thread did.
    let take_all = || {
        let (mut state, mut done) = (scratch(), 0);
        while let Some(piece) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
            if let Some((i, o)) = piece.lock().unwrap_or_else(|e| e.into_inner()).take() {
                work(&mut state, i, o);
                done += 1;
            }
        }
        done
    };
    std::thread::scope(|s| {
        let others: Vec<_> = (1..parts)
            .filter_map(|_| {
                // No thread: this one and the others take its pieces.
                std::thread::Builder::new()
                    .name("ksm-hash".into())
                    .spawn_scoped(s, || {
                        let done = take_all();
                        (thread_cpu_ns(), done)
                    })
                    .ok()
            })
            .collect();
        let mut helped = Helped {
            threads: others.len(),
            pieces: pieces.len(),
            ..Helped::default()
        };
        take_all();
        for h in others {
            let (cpu, done) = h
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            helped.cpu_ns += cpu;
            helped.pieces_done += done;
        }
        helped
    })
}

/// What the other threads of a [`map_parts`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Helped {
    /// Threads started (0: the calling thread did it all).
    pub threads: usize,
    /// Pieces of the work, and how many the other threads did.
    pub pieces: usize,
    pub pieces_done: usize,
    /// CPU time they used, in nanoseconds: the caller's [`thread_cpu_ns`] does not see
    /// it, and the scanner's CPU must be charged in full (the scan-time advisor).
    pub cpu_ns: u64,
}

impl Helped {
    /// Whether the other threads came too late to do a quarter of their share (they
    /// started on a busy core): the caller then waited for them for little.
    pub fn late(&self) -> bool {
        self.threads > 0 && self.pieces_done * 4 * (self.threads + 1) < self.pieces * self.threads
    }
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

/// Give the C allocator's free memory back to the kernel (glibc's `malloc_trim`):
/// the free chunks of every arena, the threads' ones included, which glibc only
/// returns by itself from the top of the main heap. Elsewhere a no-op.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer and only advises the kernel about memory
    // glibc's allocator holds free; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
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
        let helped = map_parts(
            &items,
            &mut out,
            (4, 1000),
            || (),
            |_, i, o| {
                for (x, y) in i.iter().zip(o) {
                    // Enough work that each thread's CPU clock moves.
                    *y = (0..2000u64).fold(*x, |a, b| a.wrapping_mul(31).wrapping_add(b));
                }
            },
        );
        for (x, y) in items.iter().zip(&out) {
            assert_eq!(
                *y,
                (0..2000u64).fold(*x, |a, b| a.wrapping_mul(31).wrapping_add(b))
            );
        }
        assert_eq!(
            (helped.threads, helped.pieces),
            (3, 10_000usize.div_ceil(MAP_PIECE))
        );
        assert!(helped.cpu_ns > 0, "{helped:?}");
        // Too few items for two parts of at least `min_part`: all done here.
        let mut few = vec![0u64; 10];
        let helped = map_parts(
            &items[..10],
            &mut few,
            (4, 1000),
            || (),
            |_, i, o| o.copy_from_slice(i),
        );
        assert_eq!((helped, &few[..]), (Helped::default(), &items[..10]));
    }

    #[test]
    fn late_means_under_a_quarter_of_a_fair_share() {
        let h = |threads, pieces, pieces_done| Helped {
            threads,
            pieces,
            pieces_done,
            cpu_ns: 0,
        };
        assert!(!h(0, 0, 0).late());
        assert!(h(1, 100, 12).late()); // a fair share: 50
        assert!(!h(1, 100, 13).late());
        assert!(h(3, 100, 18).late()); // 75
        assert!(!h(3, 100, 19).late());
    }

    #[test]
    #[should_panic(expected = "a part panicked")]
    fn a_panic_in_a_part_reaches_the_caller() {
        // Whichever thread takes the second piece panics.
        let items = [0u8; 2 * MAP_PIECE];
        let mut out = [0u8; 2 * MAP_PIECE];
        map_parts(
            &items,
            &mut out,
            (2, 1),
            || (),
            |_, i, _| {
                if i.as_ptr() != items.as_ptr() {
                    panic!("a part panicked");
                }
            },
        );
    }
}
