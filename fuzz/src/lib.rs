//! What a receiver does with a decoded message beyond decoding it: validation that must not
//! panic on any input either. Shared by the fuzz targets.

use p2p_schema::{
    Bitfield, CtlRequest, CtlResponse, Manifest, PeerRequest, PeerResponse, TrackerRequest,
    TrackerResponse,
};

fn manifest(m: &Manifest) {
    if m.validate().is_ok() {
        let _ = m.file_id();
        for i in [
            0,
            m.chunk_count().saturating_sub(1),
            m.chunk_count(),
            u32::MAX,
        ] {
            let _ = m.hash(i);
            let _ = m.chunk_range(i);
        }
    }
}

/// A decoded bitfield is well-formed whatever the input: its answers agree and indexing
/// anywhere is safe.
pub fn bitfield(b: &Bitfield) {
    for i in [0, b.len().saturating_sub(1), b.len(), u32::MAX] {
        let _ = b.get(i);
    }
    let count = b.count();
    assert!(count <= b.len());
    assert_eq!(b.is_full(), count == b.len());
    if b.len() <= 1 << 16 {
        assert_eq!(b.iter().count() as u32, count);
    }
    let _ = p2p_schema::format_ranges(b.iter().take(64));
    for n in [0, b.len(), b.len().saturating_add(1)] {
        let _ = b.clone().checked(n);
    }
}

pub fn tracker_request(m: &TrackerRequest) {
    match m {
        TrackerRequest::Register { manifest: x, .. } => manifest(x),
        TrackerRequest::Have { chunks, .. } => bitfield(chunks),
        TrackerRequest::Find { query } => {
            let _ = p2p_schema::is_hex_prefix(query);
        }
        _ => {}
    }
}

pub fn tracker_response(m: &TrackerResponse) {
    match m {
        TrackerResponse::Manifest { manifest: x } => manifest(x),
        TrackerResponse::Holders { holders, .. } => {
            holders.iter().for_each(|h| bitfield(&h.chunks))
        }
        _ => {}
    }
}

pub fn peer_request(m: &PeerRequest) {
    let _ = format!("{m:?}");
}

pub fn peer_response(m: &PeerResponse) {
    if let PeerResponse::Have { chunks } = m {
        bitfield(chunks);
    }
}

pub fn ctl_request(m: &CtlRequest) {
    let _ = format!("{m:?}");
}

pub fn ctl_response(m: &CtlResponse) {
    if let CtlResponse::Located { holders, .. } = m {
        holders.iter().for_each(|h| bitfield(&h.chunks));
    }
}
