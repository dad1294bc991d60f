//! The passthrough ClientHello peek reads the first bytes of every passthrough connection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsplice::client_hello::{Peek, peek};

fuzz_target!(|data: &[u8]| {
    let whole = peek(data);
    if let Ok(Peek::ClientHello {
        server_name: Some(name),
    }) = &whole
    {
        assert!(!name.is_empty(), "an empty server name was returned");
    }
    // A verdict on a prefix never contradicts the verdict on more bytes: a prefix is either
    // still incomplete or already says the same.
    for cut in [1, data.len() / 2] {
        if cut == 0 || cut >= data.len() {
            continue;
        }
        match peek(&data[..cut]) {
            Ok(Peek::Incomplete) => {}
            prefix => assert_eq!(prefix, whole, "a prefix of {cut} bytes decided differently"),
        }
    }
});
