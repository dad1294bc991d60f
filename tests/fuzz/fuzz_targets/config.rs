//! The configuration file: parsed and validated without panicking, whatever its text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = tlsplice::config::Config::parse(text, std::path::Path::new("fuzz.toml")) {
        // What is accepted can be written back and read again to the same configuration
        // (what `/config` shows is this serialization).
        let again = toml::to_string(&config).expect("an accepted configuration serializes");
        let reread = tlsplice::config::Config::parse(&again, std::path::Path::new("again.toml"))
            .expect("a serialized configuration parses");
        assert_eq!(reread, config);
    }
});
