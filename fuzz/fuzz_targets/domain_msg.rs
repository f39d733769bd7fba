#![no_main]
//! See `ksm_fuzz::domain_msg` (fuzz/src/domain_msg.rs) for what this target checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: ksm_fuzz::domain_msg::Input| ksm_fuzz::domain_msg::run(&input));
