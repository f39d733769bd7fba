#![no_main]
//! See `ksm_fuzz::domain_hub` (fuzz/src/domain_hub.rs) for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: ksm_fuzz::domain_hub::Input| ksm_fuzz::domain_hub::run(&input));
