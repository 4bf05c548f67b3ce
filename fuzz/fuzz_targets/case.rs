//! Conformance cases, parsed and run through the compiler (validation of every policy, the
//! incremental engine, the tables): never a panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use npm_agent::simulate::{CompilerEnforcer, run_case_text};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = run_case_text(text, &mut CompilerEnforcer::default());
});
