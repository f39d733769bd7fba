//! Reading pages of memory ksm does not own, fault-safely
//! (`process_vm_readv(2)` on ourselves).
//!
//! Why: memory the application allocated can be unmapped by the application
//! at any moment, and a plain load from it would SIGSEGV the whole process
//! (the prototype hit 185 k such reads in 10 s). `process_vm_readv` reports
//! EFAULT instead. Memory allocated by `ksm.mmap` is read with a plain copy
//! ([`Mapping::copy_out`](super::mman::Mapping::copy_out)): it is unmapped
//! only by ksm, under its state lock.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Copy `buf.len()` bytes from `addr` in this process; EFAULT if any part is unmapped.
///
/// Memory the application made inaccessible (`PROT_NONE`) is still anonymous
/// memory the kernel's KSM merges: `process_vm_readv` refuses it (EFAULT), so it is
/// read through `/proc/self/mem`, which reads any private mapping the process has.
pub fn read_foreign(addr: usize, buf: &mut [u8]) -> io::Result<()> {
    super::inject::check(super::inject::Point::ReadForeign)?;
    match read_vm(addr, buf) {
        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => read_proc_mem(addr, buf).map_err(|_| e),
        r => r,
    }
}

/// Most pages [`read_foreign_pages`] reads with one call.
pub const MAX_PAGES_AT_ONCE: usize = 64;

/// Copy the consecutive pages from `addr` into `buf` (a whole number of `page`s, at
/// most [`MAX_PAGES_AT_ONCE`]) with one `process_vm_readv` (the call costs more than
/// the copy of a page: 64 pages at once measured 2–2.5× faster per page than page by
/// page). Returns how many pages, from the first, were read; the page after
/// those could not be (unmapped, or `PROT_NONE`: [`read_foreign`] reads such a page
/// through `/proc/self/mem`). An error reads nothing.
pub fn read_foreign_pages(addr: usize, page: usize, buf: &mut [u8]) -> io::Result<usize> {
    super::inject::check(super::inject::Point::ReadForeign)?;
    let n = buf.len() / page;
    assert!(
        n <= MAX_PAGES_AT_ONCE && n * page == buf.len(),
        "whole pages, at most MAX_PAGES_AT_ONCE"
    );
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // One remote element per page: a partial read stops at the first element that
    // cannot be read (process_vm_readv(2)), so whole pages from the first were read.
    let remote: [libc::iovec; MAX_PAGES_AT_ONCE] = std::array::from_fn(|i| libc::iovec {
        iov_base: (addr + i * page) as *mut libc::c_void,
        iov_len: page,
    });
    let read = super::retry_eintr(|| {
        // SAFETY: `local` describes `buf`, valid for writes of its length, which the
        // `n` remote elements (page-sized, `n * page == buf.len()`) add up to; the
        // kernel validates the remote addresses and stops at unmapped memory instead
        // of faulting.
        super::cvt(unsafe {
            libc::process_vm_readv(
                super::getpid(),
                &local,
                1,
                remote.as_ptr(),
                n as libc::c_ulong,
                0,
            )
        })
    });
    match read {
        Ok(bytes) => Ok(bytes as usize / page),
        // Nothing readable at `addr` itself.
        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => Ok(0),
        Err(e) => Err(e),
    }
}

/// `pread` from `/proc/self/mem`, opened once per process (a descriptor inherited
/// across fork would read the parent's memory); an unmapped range is EIO.
fn read_proc_mem(addr: usize, buf: &mut [u8]) -> io::Result<()> {
    static MEM: Mutex<Option<(i32, File)>> = Mutex::new(None);
    let mut mem = MEM.lock().unwrap_or_else(|e| e.into_inner());
    let pid = super::getpid();
    if mem.as_ref().is_none_or(|(p, _)| *p != pid) {
        *mem = Some((pid, File::open("/proc/self/mem")?));
    }
    let (_, f) = mem.as_ref().expect("opened above");
    f.read_exact_at(buf, addr as u64)
}

fn read_vm(addr: usize, buf: &mut [u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let n = super::retry_eintr(|| {
        // SAFETY: `local` describes `buf`, valid for writes; the kernel validates `remote`
        // and reports unmapped memory as EFAULT instead of faulting.
        super::cvt(unsafe { libc::process_vm_readv(super::getpid(), &local, 1, &remote, 1, 0) })
    })?;
    if n as usize != buf.len() {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mman::Mapping;

    #[test]
    fn pages_are_read_up_to_the_first_that_cannot_be() {
        let page = crate::sys::page_size();
        let m = Mapping::anonymous(8 * page).unwrap();
        let mut bytes = vec![0u8; 8 * page];
        for (i, b) in bytes.chunks_mut(page).enumerate() {
            b.fill(i as u8 + 1);
        }
        m.copy_in(0, &bytes);
        let mut buf = vec![0u8; 8 * page];
        assert_eq!(read_foreign_pages(m.addr(), page, &mut buf).unwrap(), 8);
        assert_eq!(buf, bytes);
        // Page 5 inaccessible: pages 0..5 are read, and the call says so.
        // SAFETY: the page lies inside `m`, which this test owns; no Rust reference to its
        // bytes exists.
        let r = unsafe { libc::mprotect((m.addr() + 5 * page) as *mut _, page, libc::PROT_NONE) };
        assert_eq!(r, 0);
        buf.fill(0);
        assert_eq!(read_foreign_pages(m.addr(), page, &mut buf).unwrap(), 5);
        assert_eq!(buf[..5 * page], bytes[..5 * page]);
        assert_eq!(
            read_foreign_pages(m.addr() + 5 * page, page, &mut buf[..page]).unwrap(),
            0
        );
        // read_foreign reads that page through /proc/self/mem.
        read_foreign(m.addr() + 5 * page, &mut buf[..page]).unwrap();
        assert_eq!(buf[..page], bytes[5 * page..6 * page]);
    }
}
