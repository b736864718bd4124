//! Fuzzes decoding a `Bitfield` on its own (as in tracker holders and peer `Have` answers):
//! whatever decodes is well-formed, and every question about it is answered without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = ciborium::from_reader::<p2p_schema::Bitfield, _>(data) {
        p2p_fuzz::bitfield(&b);
    }
});
