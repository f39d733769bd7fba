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

/// `PAGEMAP_SCAN` categories (Linux 6.7, include/uapi/linux/fs.h).
/// In a VMA registered with an asynchronous write-protect userfaultfd (write tracking).
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// A present page whose PTE is not write-protected by a userfaultfd: in a
/// `PAGE_IS_WPALLOWED` VMA, written since it was last write-protected; in a VMA
/// registered with a synchronous userfaultfd in write-protect mode, written (or
/// unprotected) since it was last write-protected, as a write to it faults first.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// What one `PAGEMAP_SCAN` asks: its flags, the categories every page must have
/// (`mask`), one of which it must have (`anyof`), and those reported (`ret`).
#[derive(Clone, Copy)]
struct Query {
    flags: u64,
    mask: u64,
    anyof: u64,
    ret: u64,
}

/// `PAGEMAP_SCAN` flag: write-protect the pages that match (asynchronous mode only).
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;

impl Pagemap {
    /// `PAGEMAP_SCAN` over `[start, end)`: runs of present or swapped pages with their
    /// FILE/PRESENT/SWAPPED/PFNZERO/WPALLOWED categories (pages in no run are absent).
    /// Unlike plain pagemap it tells the shared zero page apart (`PAGE_IS_PFNZERO`)
    /// without privileges: such a page was only read, never written, and holds no memory.
    /// `extra`: the categories also asked for, of `PAGE_IS_FILE` and `PAGE_IS_WRITTEN`.
    /// Without `PAGE_IS_FILE` the kernel need not look at each page's `struct page`
    /// (most of the walk's cost where pages are present).
    /// Returns `(regions, walk_end)`; ENOTTY on kernels before 6.7.
    pub fn scan(
        &self,
        start: usize,
        end: usize,
        extra: u64,
        out: &mut Vec<PageRegion>,
    ) -> io::Result<usize> {
        debug_assert_eq!(extra & !(PAGE_IS_FILE | PAGE_IS_WRITTEN), 0);
        let ret = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_WPALLOWED;
        let query = Query {
            flags: 0,
            mask: 0,
            anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ret: ret | extra,
        };
        self.pm_scan(start, end, query, out)
    }

    /// The runs of pages of `[start, end)` in VMAs registered for asynchronous
    /// write-protection (`PAGE_IS_WPALLOWED`, reported for pages with no PTE too).
    pub fn tracked(
        &self,
        start: usize,
        end: usize,
        out: &mut Vec<PageRegion>,
    ) -> io::Result<usize> {
        let query = Query {
            flags: 0,
            mask: PAGE_IS_WPALLOWED,
            anyof: 0,
            ret: PAGE_IS_WPALLOWED,
        };
        self.pm_scan(start, end, query, out)
    }

    /// Write tracking: the runs of pages of `[start, end)` written since they were last
    /// write-protected by an asynchronous userfaultfd, write-protected again in the same
    /// step (`PM_SCAN_WP_MATCHING`), so that a write after this call shows at the next.
    /// VMAs not registered for asynchronous write-protection are passed over (their
    /// pages carry no `PAGE_IS_WPALLOWED` in `scan`). Returns `walk_end`.
    pub fn take_written(
        &self,
        start: usize,
        end: usize,
        out: &mut Vec<PageRegion>,
    ) -> io::Result<usize> {
        let query = Query {
            flags: PM_SCAN_WP_MATCHING,
            mask: PAGE_IS_WRITTEN,
            anyof: 0,
            ret: PAGE_IS_WRITTEN,
        };
        self.pm_scan(start, end, query, out)
    }

    /// One `PAGEMAP_SCAN` over `[start, end)` with one output slot per page (so it
    /// never stops early for lack of room); returns `walk_end`.
    fn pm_scan(
        &self,
        start: usize,
        end: usize,
        q: Query,
        out: &mut Vec<PageRegion>,
    ) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let cap = (end - start) / super::page_size();
        out.clear();
        out.resize(cap.max(1), PageRegion::default());
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: q.flags,
            start: start as u64,
            end: end as u64,
            walk_end: 0,
            vec: out.as_mut_ptr() as u64,
            vec_len: out.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: q.mask,
            category_anyof_mask: q.anyof,
            return_mask: q.ret,
        };
        let n = super::retry_eintr(|| {
            // SAFETY: `arg` is a valid `struct pm_scan_arg`; `vec` points to `vec_len`
            // writable `struct page_region`s (`out`), which outlive the call. With
            // `PM_SCAN_WP_MATCHING` it write-protects pages of asynchronous-mode
            // userfaultfd VMAs (a write then just marks them written): no contents change.
            super::cvt(unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    PAGEMAP_SCAN as _,
                    &mut arg as *mut PmScanArg,
                )
            })
        })?;
        out.truncate(n as usize);
        Ok(arg.walk_end as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mman::Mapping;

    #[test]
    fn scan_tells_zero_page_from_written_pages() {
        let page = crate::sys::page_size();
        let m = Mapping::anonymous(4 * page).unwrap();
        let mut buf = vec![0u8; page];
        m.copy_out(0, &mut buf); // read fault: maps the shared zero page
        m.copy_in(2 * page, &[1]); // write fault: a private page
        let pm = Pagemap::open().unwrap();
        let mut regions = Vec::new();
        match pm.scan(m.addr(), m.addr() + m.len(), PAGE_IS_FILE, &mut regions) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                eprintln!("skipped: PAGEMAP_SCAN needs Linux 6.7");
            }
            r => {
                assert_eq!(r.unwrap(), m.addr() + m.len());
                let cat = |addr: usize| {
                    regions
                        .iter()
                        .find(|r| r.start as usize <= addr && addr < r.end as usize)
                        .map(|r| r.categories)
                };
                assert_eq!(cat(m.addr()), Some(PAGE_IS_PRESENT | PAGE_IS_PFNZERO));
                assert_eq!(cat(m.addr() + page), None, "never touched: absent");
                assert_eq!(cat(m.addr() + 2 * page), Some(PAGE_IS_PRESENT));
            }
        }
    }
}
