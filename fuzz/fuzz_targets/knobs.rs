#![no_main]
//! See `ksm_fuzz::knobs` (fuzz/src/knobs.rs) for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: ksm_fuzz::knobs::Input| ksm_fuzz::knobs::run(&input));
