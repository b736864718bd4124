//! Fuzzes the framing and CBOR decoding of `PeerResponse`, then everything the receiver checks next.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2p_schema::frame::decode_frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) =
        decode_frame::<p2p_schema::PeerResponse>(data, p2p_schema::MAX_PEER_FRAME)
    {
        assert!(used <= data.len());
        p2p_fuzz::peer_response(&msg);
    }
});
