//! `/proc/self/pagemap`: one 64-bit entry per virtual page.
//!
//! See Documentation/admin-guide/mm/pagemap.rst. Used to find which tracked
//! pages are present (ksmd only looks at present pages, as the kernel's does)
//! and which merged pages were copied away by a write (present and not
//! file-backed), so that their frame can be released.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAP: u64 = 1 << 62;
pub const PM_FILE: u64 = 1 << 61;
pub const PM_UFFD_WP: u64 = 1 << 57;

#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    pub fn open() -> io::Result<Self> {
        Ok(Pagemap {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// Entries for `out.len()` pages starting at `addr` (page aligned).
    pub fn read(&self, addr: usize, out: &mut [u64]) -> io::Result<()> {
        let page = super::page_size();
        let mut bytes = vec![0u8; out.len() * 8];
        let off = (addr / page) as u64 * 8;
        let mut done = 0;
        while done < bytes.len() {
            let n =
                super::retry_eintr(|| self.file.read_at(&mut bytes[done..], off + done as u64))?;
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            done += n;
        }
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            *o = u64::from_ne_bytes(c.try_into().expect("8-byte chunk"));
        }
        Ok(())
    }
}
