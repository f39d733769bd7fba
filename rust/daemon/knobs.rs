//! The daemon's knobs, with the kernel's names, defaults and accepted ranges
//! (docs/kernel-contract.md, "Knobs"). A value outside the range is refused with
//! a message naming the range, and nothing changes.
//!
//! Departures from sysfs, all on the refusing side: values arrive as Python
//! ints (booleans for the on/off knobs), not strings, so `kstrtobool`'s "y"/"on"
//! spellings are not taken; the `advisor_*` knobs the kernel stores in 32 bits
//! after accepting 64 (silently truncating) refuse what does not fit.
//!
//! Three knobs are ksm's own, listed after the kernel's: `vma_reserve`, the VMAs of
//! `vm.max_map_count` kept for the application (merging costs VMAs; the
//! kernel's KSM costs none), `write_tracking` (scans skip the pages of memory
//! ksm owns that were not written since, at a small cost on the first write), and
//! `hash_threads` (the threads a scan reads and hashes pages on).

#![forbid(unsafe_code)]

use crate::error::{Error, Result};

/// `advisor_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdvisorMode {
    None,
    ScanTime,
}

impl AdvisorMode {
    pub fn name(self) -> &'static str {
        match self {
            AdvisorMode::None => "none",
            AdvisorMode::ScanTime => "scan-time",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Knobs {
    pub run: u32,
    pub pages_to_scan: u32,
    pub sleep_millisecs: u32,
    pub max_page_sharing: u32,
    pub use_zero_pages: bool,
    pub merge_across_nodes: bool,
    pub stable_node_chains_prune_millisecs: u32,
    pub smart_scan: bool,
    pub advisor_mode: AdvisorMode,
    pub advisor_max_cpu: u32,
    pub advisor_min_pages_to_scan: u32,
    pub advisor_max_pages_to_scan: u32,
    pub advisor_target_scan_time: u32,
    /// ksm's own: VMAs of `vm.max_map_count` kept for the application. Merging may
    /// add VMAs while the process has fewer than `vm.max_map_count - vma_reserve`.
    pub vma_reserve: u32,
    /// ksm's own: track writes to unmerged memory ksm owns (an asynchronous
    /// write-protect userfaultfd), so that a scan hashes only pages written since.
    pub write_tracking: bool,
    /// ksm's own: threads a scan batch reads and hashes pages on (1: in the scanning
    /// thread, page by page as the kernel's ksmd does).
    pub hash_threads: u32,
    /// `prctl(PR_SET_MEMORY_MERGE)` state (`ksm.set_memory_merge`); not a sysfs knob.
    pub merge_any: bool,
}

/// `vma_reserve`'s default: half of `vm.max_map_count` (65530 if it cannot be read)
/// as it was when first asked, so that merging leaves the application at least
/// the half of the limit that the process does not already use.
pub fn default_vma_reserve() -> u32 {
    static DEFAULT: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *DEFAULT.get_or_init(|| {
        let limit = crate::region::maps::max_map_count().unwrap_or(65530);
        u32::try_from(limit / 2).unwrap_or(i32::MAX as u32)
    })
}

/// Most `hash_threads`.
pub const MAX_HASH_THREADS: u32 = 1024;

/// `hash_threads`' default: the cores this process may run on
/// (`std::thread::available_parallelism`: CPU affinity and cgroup quota), as
/// first asked, at most `MAX_HASH_THREADS`; 1 if it cannot be told.
pub fn default_hash_threads() -> u32 {
    static DEFAULT: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *DEFAULT.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, |n| {
            u32::try_from(n.get()).map_or(MAX_HASH_THREADS, |n| n.min(MAX_HASH_THREADS))
        })
    })
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            run: 0,
            pages_to_scan: 100,
            sleep_millisecs: 20,
            max_page_sharing: 256,
            use_zero_pages: false,
            merge_across_nodes: true,
            stable_node_chains_prune_millisecs: 2000,
            smart_scan: true,
            advisor_mode: AdvisorMode::None,
            advisor_max_cpu: 70,
            advisor_min_pages_to_scan: 500,
            advisor_max_pages_to_scan: 30000,
            advisor_target_scan_time: 200,
            vma_reserve: default_vma_reserve(),
            write_tracking: true,
            hash_threads: default_hash_threads(),
            merge_any: false,
        }
    }
}

/// A knob's value: every knob is an integer except `advisor_mode`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Int(i64),
    Str(String),
}

/// What a knob accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An integer in `lo..=hi`.
    Int { lo: i64, hi: i64 },
    /// 0 or 1 (Python `bool` too).
    Bool,
    /// `"none"` or `"scan-time"`.
    Mode,
}

const U32: i64 = u32::MAX as i64;

/// Every knob in sysfs order, then ksm's own, with what it accepts.
pub const KNOBS: &[(&str, Kind)] = &[
    ("run", Kind::Int { lo: 0, hi: 2 }),
    ("pages_to_scan", Kind::Int { lo: 0, hi: U32 }),
    ("sleep_millisecs", Kind::Int { lo: 0, hi: U32 }),
    (
        "max_page_sharing",
        Kind::Int {
            lo: 2,
            hi: i32::MAX as i64,
        },
    ),
    ("use_zero_pages", Kind::Bool),
    ("merge_across_nodes", Kind::Bool),
    (
        "stable_node_chains_prune_millisecs",
        Kind::Int { lo: 0, hi: U32 },
    ),
    ("smart_scan", Kind::Bool),
    ("advisor_mode", Kind::Mode),
    ("advisor_max_cpu", Kind::Int { lo: 0, hi: U32 }),
    ("advisor_min_pages_to_scan", Kind::Int { lo: 0, hi: U32 }),
    ("advisor_max_pages_to_scan", Kind::Int { lo: 0, hi: U32 }),
    ("advisor_target_scan_time", Kind::Int { lo: 1, hi: U32 }),
    // ksm's own (`vm.max_map_count` is an int sysctl: a reserve above it keeps all).
    (
        "vma_reserve",
        Kind::Int {
            lo: 0,
            hi: i32::MAX as i64,
        },
    ),
    ("write_tracking", Kind::Bool),
    (
        "hash_threads",
        Kind::Int {
            lo: 1,
            hi: MAX_HASH_THREADS as i64,
        },
    ),
];

/// Knob names in sysfs order.
pub fn names() -> impl Iterator<Item = &'static str> {
    KNOBS.iter().map(|&(n, _)| n)
}

/// What `name` accepts, or an AttributeError naming the knobs.
pub fn kind(name: &str) -> Result<Kind> {
    KNOBS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, k)| k)
        .ok_or_else(|| {
            Error::Attribute(format!(
                "ksmd has no knob {name:?}; knobs are {}",
                names().collect::<Vec<_>>().join(", ")
            ))
        })
}

/// The accepted values of a knob, in words (for error messages and docs).
pub fn accepted(name: &str) -> String {
    match kind(name) {
        Ok(Kind::Int { lo, hi }) if name == "run" => {
            format!("{lo} (stop), 1 (run) or {hi} (stop and unmerge everything)")
        }
        Ok(Kind::Int { lo, hi }) if name == "hash_threads" => format!(
            "an integer from {lo} to {hi} (the default is the {} cores available)",
            default_hash_threads()
        ),
        Ok(Kind::Int { lo, hi }) => format!("an integer from {lo} to {hi}"),
        Ok(Kind::Bool) => "0 or 1 (or a bool)".into(),
        Ok(Kind::Mode) => "\"none\" or \"scan-time\"".into(),
        Err(_) => "nothing".into(),
    }
}

impl Knobs {
    /// Validate and set one knob. Side effects between knobs (the advisor resetting
    /// `pages_to_scan`, refusals while pages are shared) are the engine's.
    pub fn set(&mut self, name: &str, v: &Value) -> Result<()> {
        let bad =
            |shown: String| Error::Value(format!("{name} must be {}, got {shown}", accepted(name)));
        match (kind(name)?, v) {
            (Kind::Int { lo, hi }, Value::Int(x)) if (lo..=hi).contains(x) => {
                let x = *x as u32; // in range: lo ≥ 0 and hi ≤ u32::MAX
                match name {
                    "run" => self.run = x,
                    "pages_to_scan" => self.pages_to_scan = x,
                    "sleep_millisecs" => self.sleep_millisecs = x,
                    "max_page_sharing" => self.max_page_sharing = x,
                    "stable_node_chains_prune_millisecs" => {
                        self.stable_node_chains_prune_millisecs = x
                    }
                    "advisor_max_cpu" => self.advisor_max_cpu = x,
                    "advisor_min_pages_to_scan" => self.advisor_min_pages_to_scan = x,
                    "advisor_max_pages_to_scan" => self.advisor_max_pages_to_scan = x,
                    "advisor_target_scan_time" => self.advisor_target_scan_time = x,
                    "vma_reserve" => self.vma_reserve = x,
                    "hash_threads" => self.hash_threads = x,
                    _ => unreachable!("every Int knob is listed"),
                }
            }
            (Kind::Bool, Value::Int(x @ (0 | 1))) => {
                let b = *x == 1;
                match name {
                    "use_zero_pages" => self.use_zero_pages = b,
                    "merge_across_nodes" => self.merge_across_nodes = b,
                    "smart_scan" => self.smart_scan = b,
                    "write_tracking" => self.write_tracking = b,
                    _ => unreachable!("every Bool knob is listed"),
                }
            }
            (Kind::Mode, Value::Str(s)) => {
                self.advisor_mode = match s.strip_suffix('\n').unwrap_or(s) {
                    "none" => AdvisorMode::None,
                    "scan-time" => AdvisorMode::ScanTime,
                    _ => return Err(bad(format!("{s:?}"))),
                }
            }
            (_, Value::Int(x)) => return Err(bad(x.to_string())),
            (_, Value::Str(s)) => return Err(bad(format!("{s:?}"))),
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        let i = |v: u32| Value::Int(v.into());
        let b = |v: bool| Value::Int(v.into());
        Some(match name {
            "run" => i(self.run),
            "pages_to_scan" => i(self.pages_to_scan),
            "sleep_millisecs" => i(self.sleep_millisecs),
            "max_page_sharing" => i(self.max_page_sharing),
            "use_zero_pages" => b(self.use_zero_pages),
            "merge_across_nodes" => b(self.merge_across_nodes),
            "stable_node_chains_prune_millisecs" => i(self.stable_node_chains_prune_millisecs),
            "smart_scan" => b(self.smart_scan),
            "advisor_mode" => Value::Str(self.advisor_mode.name().into()),
            "advisor_max_cpu" => i(self.advisor_max_cpu),
            "advisor_min_pages_to_scan" => i(self.advisor_min_pages_to_scan),
            "advisor_max_pages_to_scan" => i(self.advisor_max_pages_to_scan),
            "advisor_target_scan_time" => i(self.advisor_target_scan_time),
            "vma_reserve" => i(self.vma_reserve),
            "write_tracking" => b(self.write_tracking),
            "hash_threads" => i(self.hash_threads),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_knob_is_listed_once_with_a_getter() {
        let mut seen = std::collections::HashSet::new();
        for n in names() {
            assert!(seen.insert(n), "{n} listed twice");
            assert!(Knobs::default().get(n).is_some(), "{n}");
        }
    }

    #[test]
    fn vma_reserve_defaults_to_half_of_the_limit() {
        let limit = crate::region::maps::max_map_count().unwrap_or(65530);
        assert_eq!(u64::from(Knobs::default().vma_reserve), limit / 2);
    }

    #[test]
    fn hash_threads_defaults_to_the_available_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(Knobs::default().hash_threads as usize, cores.min(1024));
        let mut k = Knobs::default();
        let err = k.set("hash_threads", &Value::Int(0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "hash_threads must be an integer from 1 to 1024 (the default is the {} cores available), got 0",
                default_hash_threads()
            )
        );
        assert_eq!(k, Knobs::default());
    }

    #[test]
    fn defaults_and_boundaries() {
        let defaults: &[(&str, i64)] = &[
            ("run", 0),
            ("pages_to_scan", 100),
            ("sleep_millisecs", 20),
            ("max_page_sharing", 256),
            ("use_zero_pages", 0),
            ("merge_across_nodes", 1),
            ("stable_node_chains_prune_millisecs", 2000),
            ("smart_scan", 1),
            ("advisor_max_cpu", 70),
            ("advisor_min_pages_to_scan", 500),
            ("advisor_max_pages_to_scan", 30000),
            ("advisor_target_scan_time", 200),
            ("vma_reserve", i64::from(default_vma_reserve())),
            ("write_tracking", 1),
            ("hash_threads", i64::from(default_hash_threads())),
        ];
        for &(name, default) in defaults {
            let mut k = Knobs::default();
            assert_eq!(k.get(name), Some(Value::Int(default)), "{name}");
            let (lo, hi) = match kind(name).unwrap() {
                Kind::Int { lo, hi } => (lo, hi),
                Kind::Bool => (0, 1),
                Kind::Mode => unreachable!(),
            };
            for ok in [lo, hi] {
                k.set(name, &Value::Int(ok)).unwrap();
                assert_eq!(k.get(name), Some(Value::Int(ok)));
            }
            for bad in [lo - 1, hi + 1] {
                let before = k;
                let err = k.set(name, &Value::Int(bad));
                assert!(
                    matches!(&err, Err(Error::Value(m)) if m.contains(name) && m.contains(&accepted(name))),
                    "{name}={bad}: {err:?}"
                );
                assert_eq!(k, before, "unchanged after a refused value");
            }
            let before = k;
            assert!(k.set(name, &Value::Str("1".into())).is_err());
            assert_eq!(k, before);
        }
        let mut k = Knobs::default();
        assert_eq!(k.get("advisor_mode"), Some(Value::Str("none".into())));
        k.set("advisor_mode", &Value::Str("scan-time\n".into()))
            .unwrap();
        assert_eq!(k.advisor_mode, AdvisorMode::ScanTime);
        for bad in [Value::Str("scan_time".into()), Value::Int(1)] {
            let before = k;
            assert!(matches!(k.set("advisor_mode", &bad), Err(Error::Value(_))));
            assert_eq!(k, before);
        }
        assert!(matches!(
            Knobs::default().set("nope", &Value::Int(1)),
            Err(Error::Attribute(_))
        ));
    }
}
