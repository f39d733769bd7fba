//! Fuzz targets for ksm, as plain functions: each `fuzz_targets/NAME.rs` is
//! `fuzz_target!(|input| ksm_fuzz::NAME::run(&input))`, and `cargo test` here
//! runs the same functions on pseudo-random inputs without libFuzzer (and
//! replays any saved corpus or crash files). See README.md.

pub mod frame_table;
pub mod knobs;
pub mod merge_model;
pub mod uffd_msg;

/// A small deterministic generator for the libFuzzer-free runs.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Run `f` on `iters` pseudo-random inputs of up to `max_len` bytes.
pub fn drive(seed: u64, iters: u64, max_len: usize, f: fn(&[u8])) {
    let mut rng = XorShift(seed | 1);
    for _ in 0..iters {
        let len = (rng.next_u64() as usize) % (max_len + 1);
        let data = rng.bytes(len);
        f(&data);
    }
}

/// Replay every file under `fuzz/corpus/<target>` and `fuzz/artifacts/<target>`.
pub fn replay(target: &str, f: fn(&[u8])) -> usize {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            if let Ok(data) = std::fs::read(e.path()) {
                f(&data);
                n += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Iterations per target (`KSM_FUZZ_ITERS` overrides).
    fn iters(default: u64) -> u64 {
        std::env::var("KSM_FUZZ_ITERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    }

    #[test]
    fn merge_model_random() {
        drive(0x6b736d, iters(3000), 4096, merge_model::run_bytes);
        replay("merge_model", merge_model::run_bytes);
    }

    #[test]
    fn merge_model_weighted() {
        let mut rng = XorShift(0x6d6f64656c);
        for _ in 0..iters(3000) / 3 {
            let input = merge_model::weighted_input(&mut rng, 300);
            merge_model::run(&input);
        }
    }

    #[test]
    fn frame_table_random() {
        drive(0xf4a3e, iters(20000), 2048, frame_table::run_bytes);
        replay("frame_table", frame_table::run_bytes);
    }

    #[test]
    fn knobs_random() {
        drive(0x6b6e6f62, iters(20000), 512, knobs::run_bytes);
        replay("knobs", knobs::run_bytes);
    }

    #[test]
    fn uffd_msg_random() {
        drive(0x0ffd, iters(100000), 128, uffd_msg::run_bytes);
        replay("uffd_msg", uffd_msg::run_bytes);
    }
}
