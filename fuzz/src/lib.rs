//! Fuzz targets for ksm, as plain functions: each `fuzz_targets/NAME.rs` is
//! `fuzz_target!(|input| ksm_fuzz::NAME::run(&input))`, and `cargo test` here
//! runs the same functions on pseudo-random inputs without libFuzzer (and
//! replays any saved corpus or crash files). See README.md.

pub mod domain_hub;
pub mod domain_msg;
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

/// A fuzz target's entry point: one input's bytes.
pub type Target = fn(&[u8]);

/// Every target's `run_bytes`, by name (as in `fuzz_targets/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("domain_hub", domain_hub::run_bytes),
    ("domain_msg", domain_msg::run_bytes),
    ("frame_table", frame_table::run_bytes),
    ("knobs", knobs::run_bytes),
    ("merge_model", merge_model::run_bytes),
    ("uffd_msg", uffd_msg::run_bytes),
];

/// The fuzz targets there are: the file names in `fuzz_targets/`.
pub fn target_names() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz_targets");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    v.sort();
    v
}

/// Replay every file of `fuzz/corpus/<target>` (the committed corpus, which must
/// hold at least one input) and of `fuzz/artifacts/<target>` (failures libFuzzer
/// saved here, if any): the inputs run, in `corpus` and in `artifacts`.
pub fn replay(target: &str, f: fn(&[u8])) -> (usize, usize) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut counts = [0usize; 2];
    for (dir, n) in ["corpus", "artifacts"].into_iter().zip(&mut counts) {
        let path = root.join(dir).join(target);
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(_) if dir == "artifacts" => continue,
            Err(e) => panic!("corpus of {target} missing ({}: {e})", path.display()),
        };
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for p in files {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            f(&data);
            *n += 1;
        }
    }
    assert!(
        counts[0] > 0,
        "corpus of {target} is empty (fuzz/corpus/{target})"
    );
    (counts[0], counts[1])
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
    }

    #[test]
    fn knobs_random() {
        drive(0x6b6e6f62, iters(20000), 512, knobs::run_bytes);
    }

    #[test]
    fn domain_msg_random() {
        drive(0xd0a1, iters(100000), 512, domain_msg::run_bytes);
    }

    #[test]
    fn domain_hub_random() {
        drive(0xd0b2, iters(20000), 2048, domain_hub::run_bytes);
    }

    /// Every stored input of every target (`fuzz/corpus/<target>`, which must not be
    /// empty, and `fuzz/artifacts/<target>`), each once, the targets side by side.
    #[test]
    fn corpus_of_every_target() {
        let names = target_names();
        let known: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
        assert_eq!(names, known, "fuzz_targets/ and TARGETS");
        let runs: Vec<(&str, (usize, usize))> = std::thread::scope(|s| {
            let hs: Vec<_> = TARGETS
                .iter()
                .map(|&(t, f)| (t, s.spawn(move || replay(t, f))))
                .collect();
            hs.into_iter()
                .map(|(t, h)| {
                    (
                        t,
                        h.join().unwrap_or_else(|_| panic!("{t}: an input failed")),
                    )
                })
                .collect()
        });
        for (t, (c, a)) in runs {
            eprintln!("{t}: {c} corpus inputs, {a} artifacts replayed");
        }
    }

    #[test]
    fn uffd_msg_random() {
        drive(0x0ffd, iters(100000), 128, uffd_msg::run_bytes);
    }
}
