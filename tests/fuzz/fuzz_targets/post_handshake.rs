//! A handshake record a kTLS peer sends after the handshake (the kernel hands it to the agent
//! with its record type): split into messages and judged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, record)) = data.split_first() else {
        return;
    };
    let (tls13, client) = (flags & 1 == 1, flags & 2 == 2);
    let judged = tlsplice::fuzzing::post_handshake_record(tls13, client, record);
    assert!(!judged.is_empty(), "every record gets a verdict");
    // Nothing after a fatal verdict, and the messages fit in the record.
    let fatal = judged.iter().position(|(_, _, fatal)| *fatal);
    assert!(fatal.is_none_or(|i| i == judged.len() - 1));
    let used: usize = judged.iter().map(|(_, len, _)| 4 + len).sum();
    assert!(
        used <= record.len() + 4,
        "{used} bytes judged in a {} byte record",
        record.len()
    );
});
