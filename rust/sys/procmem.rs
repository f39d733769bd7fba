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
