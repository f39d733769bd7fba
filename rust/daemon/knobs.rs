//! The daemon's knobs, with the kernel's names, defaults and accepted ranges
//! (KERNEL-KSM.md §3). A value outside the range is refused with a message
//! naming the range, and nothing changes.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Knobs {
    pub run: u32,
    pub pages_to_scan: u32,
    pub sleep_millisecs: u32,
    pub max_page_sharing: u32,
    /// `prctl(PR_SET_MEMORY_MERGE)` state (issue: merge-any).
    pub merge_any: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            run: 0,
            pages_to_scan: 100,
            sleep_millisecs: 20,
            max_page_sharing: 256,
            merge_any: false,
        }
    }
}

/// Knob names in sysfs order.
pub const NAMES: &[&str] = &[
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "max_page_sharing",
];

fn range(name: &str, v: i64, lo: i64, hi: i64, what: &str) -> Result<u32> {
    if v < lo || v > hi {
        return Err(Error::Value(format!("{name} must be {what}, got {v}")));
    }
    Ok(v as u32)
}

impl Knobs {
    /// Validate and set one knob.
    pub fn set(&mut self, name: &str, v: i64) -> Result<()> {
        const U32: i64 = u32::MAX as i64;
        match name {
            "run" => {
                self.run = range(
                    name,
                    v,
                    0,
                    2,
                    "0 (stop), 1 (run) or 2 (stop and unmerge everything)",
                )?
            }
            "pages_to_scan" => {
                self.pages_to_scan = range(name, v, 0, U32, "an integer from 0 to 4294967295")?
            }
            "sleep_millisecs" => {
                self.sleep_millisecs = range(name, v, 0, U32, "an integer from 0 to 4294967295")?
            }
            "max_page_sharing" => {
                self.max_page_sharing = range(
                    name,
                    v,
                    2,
                    i32::MAX as i64,
                    "an integer from 2 to 2147483647",
                )?
            }
            _ => {
                return Err(Error::Attribute(format!(
                    "ksmd has no knob {name:?}; knobs are {}",
                    NAMES.join(", ")
                )))
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<i64> {
        Some(match name {
            "run" => self.run.into(),
            "pages_to_scan" => self.pages_to_scan.into(),
            "sleep_millisecs" => self.sleep_millisecs.into(),
            "max_page_sharing" => self.max_page_sharing.into(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_boundaries() {
        let table: &[(&str, i64, i64, i64)] = &[
            ("run", 0, 0, 2),
            ("pages_to_scan", 100, 0, u32::MAX as i64),
            ("sleep_millisecs", 20, 0, u32::MAX as i64),
            ("max_page_sharing", 256, 2, i32::MAX as i64),
        ];
        for &(name, default, lo, hi) in table {
            let mut k = Knobs::default();
            assert_eq!(k.get(name), Some(default));
            for ok in [lo, hi] {
                k.set(name, ok).unwrap();
                assert_eq!(k.get(name), Some(ok));
            }
            for bad in [lo - 1, hi + 1] {
                let before = k;
                assert!(matches!(k.set(name, bad), Err(Error::Value(m)) if m.contains(name)));
                assert_eq!(k, before, "unchanged after a refused value");
            }
        }
        assert!(matches!(
            Knobs::default().set("nope", 1),
            Err(Error::Attribute(_))
        ));
    }
}
