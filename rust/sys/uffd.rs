//! userfaultfd(2): write-protection that guards the merge window.
//!
//! See userfaultfd(2), ioctl_userfaultfd(2) and
//! Documentation/admin-guide/mm/userfaultfd.rst. The `userfaultfd` crate does
//! not know `WP_UNPOPULATED`, `WP_ASYNC` or `PAGEMAP_SCAN`, so this is a small
//! wrapper of our own. Rules proved necessary by the prototype (docs/design.md,
//! “Userfaultfd rules”):
//!
//! * `UFFD_FEATURE_WP_UNPOPULATED` is required: without it write-protecting a
//!   page with no PTE does nothing, and writes were lost.
//! * While a non-cooperative event is unread, `UFFDIO_WRITEPROTECT` fails with
//!   EAGAIN (`mmap_changing`): [`Uffd::writeprotect`] retries.
//! * Replacing a VMA does not wake a writer blocked on it: every merge path
//!   ends with [`Uffd::wake`] or an un-protect (which wakes).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use super::{cvt, retry_eintr};

pub const UFFD_API: u64 = 0xAA;

pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const FEATURE_MOVE: u64 = 1 << 16;

const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const REGISTER_MODE_MINOR: u64 = 1 << 2;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const COPY_MODE_WP: u64 = 1 << 1;
const CONTINUE_MODE_WP: u64 = 1 << 1;

pub const EVENT_PAGEFAULT: u8 = 0x12;
pub const EVENT_FORK: u8 = 0x13;
pub const EVENT_REMAP: u8 = 0x14;
pub const EVENT_REMOVE: u8 = 0x15;
pub const EVENT_UNMAP: u8 = 0x16;

pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// `UFFD_USER_MODE_ONLY`: the flag an unprivileged process needs when
/// `vm.unprivileged_userfaultfd = 0`.
const USER_MODE_ONLY: i32 = 1;

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, 16);
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, 24);
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, 40);
const UFFDIO_CONTINUE: u64 = ioc(IOC_READ | IOC_WRITE, 0x07, 32);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0x00, 0);

#[repr(C)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}
#[repr(C)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct WriteProtectArg {
    range: Range,
    mode: u64,
}
#[repr(C)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
struct ContinueArg {
    range: Range,
    mode: u64,
    mapped: i64,
}

/// How the descriptor was obtained; user-mode-only contexts do not see faults
/// raised inside the kernel (e.g. `read(2)` into a page under merge fails with
/// EFAULT instead of blocking), so the docs and `ksm info` report the mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `/dev/userfaultfd` (any user with access to the device node).
    Device,
    /// The `userfaultfd(2)` syscall, full mode (privileged or sysctl allows).
    Syscall,
    /// The syscall with `UFFD_USER_MODE_ONLY`.
    UserModeOnly,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Device => "/dev/userfaultfd",
            Mode::Syscall => "userfaultfd(2)",
            Mode::UserModeOnly => "userfaultfd(2), user-mode only",
        }
    }
}

/// One decoded `struct uffd_msg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Msg {
    /// A fault; `wp` is set for write-protect faults.
    PageFault {
        addr: u64,
        flags: u64,
        tid: u32,
    },
    Fork {
        fd: u32,
    },
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
    /// An event this version does not know (kept, never dropped silently).
    Unknown {
        event: u8,
    },
}

pub const MSG_SIZE: usize = 32;

impl Msg {
    /// Decode one 32-byte message (layout of `struct uffd_msg`, little-endian fields
    /// in native order). Pure: fuzzed in `fuzz/`.
    pub fn decode(b: &[u8; MSG_SIZE]) -> Msg {
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        match b[0] {
            EVENT_PAGEFAULT => Msg::PageFault {
                flags: u64_at(8),
                addr: u64_at(16),
                tid: u32_at(24),
            },
            EVENT_FORK => Msg::Fork { fd: u32_at(8) },
            EVENT_REMAP => Msg::Remap {
                from: u64_at(8),
                to: u64_at(16),
                len: u64_at(24),
            },
            EVENT_REMOVE => Msg::Remove {
                start: u64_at(8),
                end: u64_at(16),
            },
            EVENT_UNMAP => Msg::Unmap {
                start: u64_at(8),
                end: u64_at(16),
            },
            event => Msg::Unknown { event },
        }
    }
}

/// An open, initialised userfaultfd context (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    mode: Mode,
}

impl Uffd {
    /// Open a context: `/dev/userfaultfd` first, then the syscall (full, then
    /// user-mode only on EPERM).
    fn open_raw() -> io::Result<(OwnedFd, Mode)> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // ENOENT (old kernel, no node) or EACCES (node not accessible to us): try the syscall.
        if let Ok(dev) = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/userfaultfd")
        {
            // SAFETY: ioctl on a device fd we own; the argument is an int by value.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if let Ok(raw) = cvt(r) {
                // SAFETY: the ioctl returned a new fd that nothing else owns.
                return Ok((unsafe { OwnedFd::from_raw_fd(raw) }, Mode::Device));
            }
            // Fall through to the syscall: the node exists but refused (e.g. EPERM).
        }
        // SAFETY: the userfaultfd syscall takes one int of flags and returns a new fd.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        match cvt(r) {
            // SAFETY: the syscall returned a new fd that nothing else owns.
            Ok(raw) => Ok((unsafe { OwnedFd::from_raw_fd(raw as i32) }, Mode::Syscall)),
            // EPERM: vm.unprivileged_userfaultfd = 0 and no CAP_SYS_PTRACE; user-mode-only
            // contexts are still allowed for everyone.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                // SAFETY: as above.
                let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | USER_MODE_ONLY) };
                let raw = cvt(r)? as i32;
                // SAFETY: the syscall returned a new fd that nothing else owns.
                Ok((unsafe { OwnedFd::from_raw_fd(raw) }, Mode::UserModeOnly))
            }
            Err(e) => Err(e),
        }
    }

    fn api(fd: &OwnedFd, features: u64) -> io::Result<u64> {
        let mut arg = ApiArg {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `arg` is a valid `struct uffdio_api` for the duration of the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut arg) })?;
        Ok(arg.features)
    }

    /// The features this kernel offers (a throw-away context: the handshake can
    /// be done once per context).
    pub fn probe() -> io::Result<(u64, Mode)> {
        let (fd, mode) = Self::open_raw()?;
        Ok((Self::api(&fd, 0)?, mode))
    }

    /// Open a context with exactly `features` (all must be offered).
    pub fn open(features: u64) -> io::Result<Self> {
        let (fd, mode) = Self::open_raw()?;
        let got = Self::api(&fd, features)?;
        Ok(Uffd {
            fd,
            features: got,
            mode,
        })
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// `UFFDIO_REGISTER` in write-protect mode.
    pub fn register_wp(&self, start: usize, len: usize) -> io::Result<()> {
        self.register(start, len, REGISTER_MODE_WP)
    }

    /// `UFFDIO_REGISTER` in write-protect and minor-fault mode: for merged pages
    /// (private mappings of the frame pool, a memfd). A minor fault is raised when
    /// such a page has no PTE although its frame is in the page cache, which is how
    /// an application's `MADV_DONTNEED` of a merged page becomes visible to us
    /// (the fault thread then gives it zeros, see `daemon`). EINVAL without
    /// `FEATURE_MINOR_SHMEM` or on a VMA that is not shmem.
    pub fn register_wp_minor(&self, start: usize, len: usize) -> io::Result<()> {
        if self.features & FEATURE_MINOR_SHMEM == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // Missing faults too: a page of a pool mapping with no PTE over a free frame
        // (a covered page the application discarded) must read zeros, and the fault
        // thread gives it an anonymous page of zeros rather than let shmem put a page
        // into the pool at an offset that a later frame reuses.
        self.register(
            start,
            len,
            REGISTER_MODE_MISSING | REGISTER_MODE_WP | REGISTER_MODE_MINOR,
        )
    }

    /// `UFFDIO_REGISTER` in missing-fault mode: for the scratch memory of an unmerge,
    /// which [`Uffd::copy`] then fills (it needs the range registered with this
    /// context). Nothing may fault there while it is registered: no thread serves
    /// missing faults; unregister before anything else touches the range.
    pub fn register_missing(&self, start: usize, len: usize) -> io::Result<()> {
        self.register(start, len, REGISTER_MODE_MISSING)
    }

    fn register(&self, start: usize, len: usize, mode: u64) -> io::Result<()> {
        super::inject::check(super::inject::Point::Register)?;
        let mut arg = RegisterArg {
            range: range(start, len),
            mode,
            ioctls: 0,
        };
        ioctl(&self.fd, &mut arg)?;
        Ok(())
    }

    /// `UFFDIO_CONTINUE`: resolve a minor fault by mapping the page-cache page
    /// (the frame, read-only in our private mappings), write-protected if `wp`.
    /// Wakes the faulting threads. Changes no byte anyone reads.
    pub fn continue_minor(&self, start: usize, len: usize, wp: bool) -> io::Result<()> {
        let mut arg = ContinueArg {
            range: range(start, len),
            mode: if wp { CONTINUE_MODE_WP } else { 0 },
            mapped: 0,
        };
        ioctl(&self.fd, &mut arg)?;
        Ok(())
    }

    /// `UFFDIO_CONTINUE` of `[start, start+len)`, a new private mapping of the frame
    /// pool registered in minor mode whose pages have no PTE yet: each maps its frame
    /// (read-only, copy-on-write), and the mapping gets its `anon_vma` on the way (see
    /// `os::Os::map_frames`). Not for the fault thread (fault injection point).
    pub fn populate_minor(&self, start: usize, len: usize) -> io::Result<()> {
        super::inject::check(super::inject::Point::Continue)?;
        self.continue_minor(start, len, false)
    }

    /// `UFFDIO_COPY` of zeros: resolve a minor fault on a page whose contents the
    /// application discarded (`MADV_DONTNEED`) by giving it a private page of
    /// zeros, write-protected if `wp`; only where the page has no PTE (EEXIST
    /// otherwise), so it can never replace a page someone wrote. Wakes the
    /// faulting threads.
    pub fn fill_zeros(&self, start: usize, page: usize, wp: bool) -> io::Result<()> {
        let zeros = vec![0u8; page];
        let mut arg = CopyArg {
            dst: start as u64,
            src: zeros.as_ptr() as u64,
            len: page as u64,
            mode: if wp { COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        ioctl(&self.fd, &mut arg)?;
        Ok(())
    }

    /// `UFFDIO_COPY` of `[src, src+len)` of this process into `[dst, dst+len)`, a range
    /// registered in missing mode ([`Uffd::register_missing`]) whose pages have no
    /// PTE: the kernel allocates each page and copies into it, with no page fault and
    /// no zero-filling (the unmerge copy). A source the kernel cannot read is EFAULT,
    /// never a signal; a copy cut short by a pending event is resumed here.
    pub fn copy(&self, dst: usize, src: usize, len: usize) -> io::Result<()> {
        let mut done = 0usize;
        while done < len {
            let mut arg = CopyArg {
                dst: (dst + done) as u64,
                src: (src + done) as u64,
                len: (len - done) as u64,
                mode: 0,
                copy: 0,
            };
            match ioctl(&self.fd, &mut arg) {
                Ok(_) => return Ok(()),
                // Partly done (`copy` bytes), or nothing while an event is unread.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    if arg.copy > 0 {
                        done += arg.copy as usize;
                    } else {
                        std::thread::yield_now();
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// [`Uffd::copy`] in consecutive parts on up to `threads` threads (see
    /// [`in_parts`](super::in_parts)); `page` aligns the parts.
    pub fn copy_parallel(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        threads: usize,
        page: usize,
    ) -> io::Result<()> {
        super::in_parts(len, threads, page, |off, n| {
            self.copy(dst + off, src + off, n)
        })
    }

    /// Give the private VMA holding `dst` (registered with this context) its
    /// `anon_vma` now, changing no page: the kernel prepares it at the start of every
    /// `UFFDIO_COPY` into a private mapping, before it copies from the source, and
    /// the source here is `unreadable` (a `PROT_NONE` page), so the copy stops with
    /// EFAULT before anything is installed. Without this, the first write to a page
    /// of a new mapping of the frame pool allocates it inside the application's
    /// page fault (a third of the fault's cost for a lone merged page). Best effort:
    /// any answer but EFAULT (EEXIST is impossible: nothing is read) is ignored.
    pub fn prepare_anon_vma(&self, dst: usize, page: usize, unreadable: usize) {
        let mut arg = CopyArg {
            dst: dst as u64,
            src: unreadable as u64,
            len: page as u64,
            mode: 0,
            copy: 0,
        };
        let _ = ioctl(&self.fd, &mut arg);
    }

    /// `UFFDIO_UNREGISTER` (wakes any waiter in the range).
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        ioctl_range(&self.fd, UFFDIO_UNREGISTER, range(start, len))?;
        Ok(())
    }

    /// `UFFDIO_WRITEPROTECT`: protect (`on`) or unprotect-and-wake (`!on`).
    ///
    /// EAGAIN means an event (UNMAP, REMAP, REMOVE, FORK) is in flight and not
    /// yet read by the fault thread; it is retried here, yielding, since the
    /// fault thread is a different thread (docs/design.md, "The mechanism").
    pub fn writeprotect(&self, start: usize, len: usize, on: bool) -> io::Result<()> {
        loop {
            match self.writeprotect_once(start, len, on) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                r => return r,
            }
        }
    }

    /// `UFFDIO_WRITEPROTECT` once: EAGAIN while an event is unread. The fault thread
    /// must use this one: it is the reader of the event, so it must not wait for it.
    pub fn writeprotect_once(&self, start: usize, len: usize, on: bool) -> io::Result<()> {
        super::inject::check(super::inject::Point::WriteProtect)?;
        let mut arg = WriteProtectArg {
            range: range(start, len),
            mode: if on { WRITEPROTECT_MODE_WP } else { 0 },
        };
        ioctl(&self.fd, &mut arg).map(|_| ())
    }

    /// Open a merge window: write-protect `[start, start+len)`. Writers block in
    /// the fault thread until [`Uffd::close_window`].
    pub(crate) fn open_window(&self, start: usize, len: usize) -> io::Result<Window> {
        self.writeprotect(start, len, true)?;
        Ok(Window { addr: start, len })
    }

    /// End a merge window: unprotect (which also wakes) if `unprotect`, else just
    /// wake. Waking is needed on every path: replacing a VMA does not wake a
    /// writer blocked on the old one (measured: 430 of 962 merges left it asleep).
    pub fn close_window(&self, w: Window, unprotect: bool) -> io::Result<()> {
        let r = if unprotect {
            self.writeprotect(w.addr, w.len, false)
        } else {
            Ok(())
        };
        // Wake even if unprotecting failed (e.g. the range was replaced): a waiter
        // retries its access and faults again if still protected.
        let wake = self.wake(w.addr, w.len);
        r.and(wake)
    }

    /// Shrink a merge window to its first `keep` bytes (a whole number of pages, less
    /// than its length): the rest is unprotected (which also wakes) and woken, as by
    /// `close_window`. The window proves protection of what it keeps only.
    pub fn shrink_window(&self, w: &mut Window, keep: usize) -> io::Result<()> {
        if keep >= w.len {
            return Ok(());
        }
        let (start, len) = (w.addr + keep, w.len - keep);
        w.len = keep;
        let r = self.writeprotect(start, len, false);
        let wake = self.wake(start, len);
        r.and(wake)
    }

    /// `UFFDIO_WAKE`: wake threads blocked on faults in the range. Works even
    /// after the VMA they faulted on was replaced.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        ioctl_range(&self.fd, UFFDIO_WAKE, range(start, len))?;
        Ok(())
    }

    /// Wait up to `timeout` until a message can be read (false: none came).
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            return match cvt(n) {
                Err(e) if e.raw_os_error() != Some(libc::EINTR) => Err(e),
                _ => Ok(false),
            };
        }
        Ok(true)
    }

    /// Read the messages available now (none if another reader took them) into `out`.
    pub fn read_available(&self, out: &mut Vec<Msg>) -> io::Result<()> {
        out.clear();
        let mut buf = [0u8; MSG_SIZE * 16];
        // SAFETY: `buf` is valid for writes of its length.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match cvt(r) {
            Ok(n) => {
                for c in buf[..n as usize].chunks_exact(MSG_SIZE) {
                    out.push(Msg::decode(c.try_into().expect("32-byte chunk")));
                }
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A write-protected range: proof, for the remapping functions of
/// [`mman`](super::mman), that no write can land while it is open.
#[derive(Debug)]
pub struct Window {
    addr: usize,
    len: usize,
}

impl Window {
    pub fn addr(&self) -> usize {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The `struct`s passed to our ioctls, tied to their request numbers.
///
/// # Safety
/// `REQUEST` must be an ioctl whose argument is a pointer to `Self`.
unsafe trait IoctlArg {
    const REQUEST: u64;
}
// SAFETY: each request number below is defined by the UAPI for exactly this struct.
unsafe impl IoctlArg for RegisterArg {
    const REQUEST: u64 = UFFDIO_REGISTER;
}
// SAFETY: as above (`struct uffdio_writeprotect`).
unsafe impl IoctlArg for WriteProtectArg {
    const REQUEST: u64 = UFFDIO_WRITEPROTECT;
}
// SAFETY: as above (`struct uffdio_copy`). UFFDIO_COPY writes the page it installs,
// and only where no PTE exists: it never replaces bytes anyone could read.
unsafe impl IoctlArg for CopyArg {
    const REQUEST: u64 = UFFDIO_COPY;
}
// SAFETY: as above (`struct uffdio_continue`); it maps an existing page-cache page.
unsafe impl IoctlArg for ContinueArg {
    const REQUEST: u64 = UFFDIO_CONTINUE;
}

/// `ioctl(fd, T::REQUEST, arg)` on a userfaultfd, EINTR retried.
fn ioctl<T: IoctlArg>(fd: &OwnedFd, arg: &mut T) -> io::Result<i32> {
    retry_eintr(|| {
        // SAFETY: `T::REQUEST` takes a pointer to `T` (the trait's contract) and `arg` is
        // valid for reads and writes (COPY's `src` is read by the kernel with
        // copy_from_user, which reports an unreadable source as EFAULT); none of these
        // ioctls changes a byte anyone can read: COPY and CONTINUE only fill pages that
        // have no PTE.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), T::REQUEST as _, arg as *mut T) })
    })
}

/// `ioctl` with a `struct uffdio_range` (UNREGISTER, WAKE).
fn ioctl_range(fd: &OwnedFd, request: u64, mut arg: Range) -> io::Result<i32> {
    debug_assert!(request == UFFDIO_UNREGISTER || request == UFFDIO_WAKE);
    retry_eintr(|| {
        // SAFETY: both requests take a pointer to `struct uffdio_range`, which `arg` is.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &mut arg as *mut Range) })
    })
}

fn range(start: usize, len: usize) -> Range {
    Range {
        start: start as u64,
        len: len as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_pagefault_and_events() {
        let mut b = [0u8; MSG_SIZE];
        b[0] = EVENT_PAGEFAULT;
        b[8..16].copy_from_slice(&PAGEFAULT_FLAG_WP.to_ne_bytes());
        b[16..24].copy_from_slice(&0x7000u64.to_ne_bytes());
        b[24..28].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(
            Msg::decode(&b),
            Msg::PageFault {
                addr: 0x7000,
                flags: PAGEFAULT_FLAG_WP,
                tid: 42
            }
        );
        b[0] = EVENT_UNMAP;
        assert_eq!(
            Msg::decode(&b),
            Msg::Unmap {
                start: PAGEFAULT_FLAG_WP,
                end: 0x7000
            }
        );
        b[0] = 0x99;
        assert_eq!(Msg::decode(&b), Msg::Unknown { event: 0x99 });
    }

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        // Values from <linux/userfaultfd.h> on x86_64/aarch64.
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010aa02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018aa06);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        assert_eq!(UFFDIO_CONTINUE, 0xc020aa07);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }

    #[test]
    fn a_parallel_copy_copies_every_part_and_reports_a_fault() {
        let Ok(u) = Uffd::open(0) else {
            eprintln!("skipped: userfaultfd cannot be opened here");
            return;
        };
        let page = crate::sys::page_size();
        // 3 MiB and a page: three threads, the last part shorter.
        let len = 3 * super::super::PART_MIN + page;
        let src = crate::sys::mman::Mapping::anonymous(len).unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i / page * 7 + i) as u8).collect();
        src.copy_in(0, &bytes);
        let dst = crate::sys::mman::Mapping::anonymous(len).unwrap();
        u.register_missing(dst.addr(), len).unwrap();
        u.copy_parallel(dst.addr(), src.addr(), len, 3, page)
            .unwrap();
        u.unregister(dst.addr(), len).unwrap();
        let mut out = vec![0u8; len];
        dst.copy_out(0, &mut out);
        assert!(out == bytes, "every part copied to its place");
        // A source the kernel cannot read: EFAULT, whichever part met it.
        let dst = crate::sys::mman::Mapping::anonymous(len).unwrap();
        u.register_missing(dst.addr(), len).unwrap();
        let e = u
            .copy_parallel(dst.addr(), 0x1000, len, 3, page)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
        u.unregister(dst.addr(), len).unwrap();
    }

    #[test]
    fn preparing_the_anon_vma_changes_no_page() {
        let Ok(u) = Uffd::open(0) else {
            eprintln!("skipped: userfaultfd cannot be opened here");
            return;
        };
        let page = crate::sys::page_size();
        let fd = crate::sys::memfd::Memfd::create(c"ksm-test", 2 * page as u64).unwrap();
        fd.write_at(0, &vec![0x5a; page]).unwrap();
        let m = crate::sys::mman::Mapping::file_private(fd.raw(), 0, 2 * page).unwrap();
        let hole = m.addr() + page; // no page in the file there, no PTE
        let nothing = crate::sys::mman::Mapping::inaccessible(page).unwrap();
        let mut b = vec![0u8; page];
        m.copy_out(0, &mut b); // PTE of the file's page
        u.register_missing(m.addr(), 2 * page).unwrap();
        u.prepare_anon_vma(m.addr(), page, nothing.addr());
        u.prepare_anon_vma(hole, page, nothing.addr());
        u.unregister(m.addr(), 2 * page).unwrap();
        let pm = crate::sys::pagemap::Pagemap::open().unwrap();
        let mut e = [0u64; 2];
        pm.read(m.addr(), &mut e).unwrap();
        use crate::sys::pagemap::{PM_FILE, PM_PRESENT};
        assert_eq!(
            e[0] & (PM_PRESENT | PM_FILE),
            PM_PRESENT | PM_FILE,
            "still the file's page"
        );
        assert_eq!(e[1] & PM_PRESENT, 0, "nothing installed in the hole");
        m.copy_out(0, &mut b);
        assert!(b.iter().all(|&x| x == 0x5a));
        assert_eq!(
            fd.allocated_bytes().unwrap(),
            page as u64,
            "no page added to the file"
        );
    }

    #[test]
    fn open_and_write_protect() {
        let Ok((avail, _)) = Uffd::probe() else {
            eprintln!("skipped: userfaultfd cannot be opened here");
            return;
        };
        if avail & FEATURE_WP_UNPOPULATED == 0 {
            eprintln!("skipped: kernel lacks UFFD_FEATURE_WP_UNPOPULATED");
            return;
        }
        let u = Uffd::open(FEATURE_WP_UNPOPULATED | FEATURE_PAGEFAULT_FLAG_WP).unwrap();
        let m = crate::sys::mman::Mapping::anonymous(4 * crate::sys::page_size()).unwrap();
        u.register_wp(m.addr(), m.len()).unwrap();
        u.writeprotect(m.addr(), m.len(), true).unwrap();
        let pm = crate::sys::pagemap::Pagemap::open().unwrap();
        let mut e = [0u64; 1];
        pm.read(m.addr(), &mut e).unwrap();
        assert_ne!(
            e[0] & crate::sys::pagemap::PM_UFFD_WP,
            0,
            "WP_UNPOPULATED marks an empty page"
        );
        u.writeprotect(m.addr(), m.len(), false).unwrap();
        u.wake(m.addr(), m.len()).unwrap();
        u.unregister(m.addr(), m.len()).unwrap();
    }
}
