//! Parsing `/proc/self/maps`: which parts of a range are mapped, and how.
//!
//! Used by `madvise` on memory ksm does not own (ENOMEM for gaps; MAP_SHARED,
//! file-backed and special mappings are accepted and never merged, as the
//! kernel's `ksm_compatible()` does) and to refresh foreign regions' protection.

#![forbid(unsafe_code)]

/// One line of /proc/<pid>/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: usize,
    pub end: usize,
    pub prot: i32,
    pub shared: bool,
    /// File offset of `start` (for our pool: frame number × page size).
    pub offset: u64,
    pub inode: u64,
    pub path: String,
}

impl Vma {
    /// Anonymous private memory (what ksm can merge). Merged pages of ours show
    /// as private mappings of "/memfd:ksm-frames (deleted)" and count as eligible.
    pub fn eligible(&self) -> bool {
        !self.shared
            && (self.inode == 0 || self.path.starts_with(crate::pool::POOL_PATH_PREFIX))
            && !matches!(
                self.path.as_str(),
                "[vvar]" | "[vdso]" | "[vsyscall]" | "[vvar_vclock]"
            )
    }
}

/// Parse one maps line; `None` for a malformed line.
pub fn parse_line(line: &str) -> Option<Vma> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let _dev = it.next()?;
    let rest = it.next()?;
    let (inode, path) = match it.next() {
        Some(p) => (rest, p.trim_start()),
        None => (rest, ""),
    };
    let (s, e) = range.split_once('-')?;
    let start = usize::from_str_radix(s, 16).ok()?;
    let end = usize::from_str_radix(e, 16).ok()?;
    if perms.len() < 4 || end < start {
        return None;
    }
    let mut prot = 0;
    if perms[0] == b'r' {
        prot |= libc::PROT_READ;
    }
    if perms[1] == b'w' {
        prot |= libc::PROT_WRITE;
    }
    if perms[2] == b'x' {
        prot |= libc::PROT_EXEC;
    }
    Some(Vma {
        start,
        end,
        prot,
        shared: perms[3] == b's',
        offset,
        inode: inode.trim().parse().ok()?,
        path: path.trim_end().to_string(),
    })
}

/// Parse a whole maps file.
pub fn parse(text: &str) -> Vec<Vma> {
    text.lines().filter_map(parse_line).collect()
}

/// Read and parse `/proc/self/maps`.
pub fn read_self() -> std::io::Result<Vec<Vma>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/maps")?))
}

/// The `VmFlags:` of the VMA containing `addr`, from /proc/self/smaps (two-letter codes).
pub fn vm_flags(addr: usize) -> std::io::Result<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/smaps")?;
    let mut inside = false;
    for line in text.lines() {
        if let Some(v) = parse_line(line) {
            inside = v.start <= addr && addr < v.end;
        } else if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return Ok(flags.split_whitespace().map(str::to_owned).collect());
            }
        }
    }
    Ok(Vec::new())
}

/// VMA flags under which merging would break what the application asked for:
/// `wf` (MADV_WIPEONFORK: a child must read zeros), `dc` (MADV_DONTFORK), `dd`
/// (MADV_DONTDUMP) and `lo` (mlock: the kernel copies on lock, nothing is saved).
/// A remap would drop the first three, so such memory is accepted and never merged.
pub const NEVER_MERGE_FLAGS: &[&str] = &["wf", "dc", "dd", "lo"];

/// Number of VMAs of this process (lines of /proc/self/maps).
pub fn count_self() -> std::io::Result<u64> {
    let text = std::fs::read("/proc/self/maps")?;
    Ok(text.iter().filter(|&&b| b == b'\n').count() as u64)
}

/// `vm.max_map_count`.
pub fn max_map_count() -> std::io::Result<u64> {
    let t = std::fs::read_to_string("/proc/sys/vm/max_map_count")?;
    t.trim()
        .parse()
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// The pieces of `[start, end)` covered by `vmas` (sorted), clipped, and whether a gap exists.
pub fn cover(vmas: &[Vma], start: usize, end: usize) -> (Vec<Vma>, bool) {
    let mut out = Vec::new();
    let mut pos = start;
    let mut gap = false;
    for v in vmas.iter().filter(|v| v.end > start && v.start < end) {
        if v.start > pos {
            gap = true;
        }
        let mut c = v.clone();
        c.start = c.start.max(start);
        c.end = c.end.min(end);
        pos = c.end;
        out.push(c);
    }
    if pos < end {
        gap = true;
    }
    (out, gap)
}

/// Whether a process other than `self_pid` maps the file with `inode` whose maps
/// path starts with `prefix` (a forked child still mapping frames of our pool).
/// Processes whose maps cannot be read (other users) are not our children.
pub fn others_map(inode: u64, prefix: &str, self_pid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    for ent in dir.flatten() {
        let name = ent.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == self_pid {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        if text
            .lines()
            .filter_map(parse_line)
            .any(|v| v.inode == inode && v.path.starts_with(prefix))
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_anonymous_file_and_shared_lines() {
        let t = "7f0000000000-7f0000002000 rw-p 00000000 00:00 0 \n\
                 7f0000002000-7f0000003000 r--s 00000000 00:05 1234                       /memfd:x (deleted)\n\
                 7f0000004000-7f0000005000 r--p 00001000 00:05 99    /memfd:ksm-frames (deleted)\n";
        let v = parse(t);
        assert_eq!(v.len(), 3);
        assert!(v[0].eligible() && v[0].prot == libc::PROT_READ | libc::PROT_WRITE);
        assert!(v[1].shared && !v[1].eligible() && v[1].path == "/memfd:x (deleted)");
        assert!(v[2].eligible(), "our own merged pages stay eligible");
        let (c, gap) = cover(&v, 0x7f0000001000, 0x7f0000005000);
        assert!(gap);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].start, 0x7f0000001000);
    }
}
