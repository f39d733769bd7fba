//! Reading pages of memory ksm does not own, fault-safely
//! (`process_vm_readv(2)` on ourselves).
//!
//! Why: memory the application allocated can be unmapped by the application
//! at any moment, and a plain load from it would SIGSEGV the whole process
//! (the prototype hit 185 k such reads in 10 s). `process_vm_readv` reports
//! EFAULT instead. Memory allocated by `ksm.mmap` is read with a plain copy
//! ([`Mapping::copy_out`](super::mman::Mapping::copy_out)): it is unmapped
//! only by ksm, under its state lock.

use std::io;

/// Copy `buf.len()` bytes from `addr` in this process; EFAULT if any part is unmapped.
pub fn read_foreign(addr: usize, buf: &mut [u8]) -> io::Result<()> {
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
