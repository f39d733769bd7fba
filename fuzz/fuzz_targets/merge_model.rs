#![no_main]
//! See `ksm_fuzz::merge_model` (fuzz/src/merge_model.rs) for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: ksm_fuzz::merge_model::Input| ksm_fuzz::merge_model::run(&input));
