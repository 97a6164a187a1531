//! Feeds arbitrary bytes to the agent's message decoder, the session-bind
//! parser and its signature check: none may panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keyholder_agent::fuzz_one(data);
});
