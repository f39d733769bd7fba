#![no_main]
//! See `ksm_fuzz::frame_table` (fuzz/src/frame_table.rs) for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: ksm_fuzz::frame_table::Input| ksm_fuzz::frame_table::run(&input));
