//! The wire protocol shared by `p2p-tracker`, `p2pd` and `p2pctl`: identifiers, manifests,
//! framing and every message. This crate is the protocol's specification.
//!
//! # Parties and channels
//!
//! ```text
//!   p2pctl ──control (Unix socket)──▶ p2pd ──tracker (TCP)──▶ p2p-tracker
//!                                      │ ▲
//!                               peer (TCP, chunks)
//!                                      ▼ │
//!                                     p2pd ...
//! ```
//!
//! - **control**: `p2pctl` to its local daemon, one command per connection
//!   ([`CtlRequest`] / [`CtlResponse`]). Streaming commands (`register`, `download`) send
//!   several responses, the last one final.
//! - **tracker**: each daemon keeps one TCP session to the tracker ([`TrackerRequest`] /
//!   [`TrackerResponse`]), pipelined: one response per request, in order. It carries
//!   registrations, holdings, look-ups and heartbeats; the tracker drops a peer whose session
//!   has been silent for the TTL, or at once on [`TrackerRequest::Bye`]. The list of files is
//!   paged: [`TrackerRequest::ListPage`] (at most [`LIST_PAGE_MAX`] files, after a
//!   [`ListCursor`]) answered by [`TrackerResponse::FilePage`] with the cursor of the next
//!   page, asked again until there is none, so no answer outgrows a frame. A tracker says it
//!   pages in its welcome (`list_pages`); the unpaged [`TrackerRequest::List`] of earlier
//!   daemons is still answered, with at most [`LIST_UNPAGED_MAX`] files.
//! - **peer**: a downloader opens a TCP connection to each holder ([`PeerRequest`] /
//!   [`PeerResponse`]) and pipelines several `GetChunk` requests; each chunk comes back as a
//!   small [`PeerResponse::Chunk`] frame followed by the raw bytes. A downloader also
//!   watches the file on each connection ([`PeerRequest::Watch`], to a peer whose welcome
//!   said `pushes`): the holder answers with what it holds and from then on pushes every
//!   chunk it gains ([`PeerResponse::Gained`]) between its answers, so connected peers know
//!   within a commit interval what each other holds, without asking the tracker.
//!
//! # Framing
//!
//! Every message is a frame: a `u32` big-endian length, then that many bytes holding exactly
//! one CBOR value (see [`frame`]). The length is checked against the channel's maximum
//! ([`MAX_FRAME`], or [`MAX_PEER_FRAME`] for what peers send) before anything is allocated.
//! Chunk payloads are not framed: they follow their header raw.
//!
//! # Secure sessions, handshake and versions
//!
//! A tracker connection, and a peer connection in a closed swarm (or with `--encrypt`),
//! first runs a Noise handshake ([`secure`]): both sides prove their long-lived key (a
//! daemon's [`PeerId`] is derived from it), a closed swarm's secret is proven without being
//! sent, and every byte after it is encrypted. Frames then travel inside the encrypted
//! stream exactly as on a plain connection. Peer connections in an open swarm stay plain.
//!
//! Then every connection opens with a hello from the connecting side carrying
//! [`PROTOCOL_VERSION`]; the other side answers with a welcome, or with an error
//! ([`ErrorCode::UnsupportedVersion`]) and closes. A plain hello where a secure session is
//! expected (a daemon of version 1) is answered with that error in the plain framing. Enum variants travel by name, so new
//! variants and new `Option` fields with `#[serde(default)]` keep the wire compatible.
//!
//! # Identity and integrity
//!
//! A file is its [`Manifest`]: size, chunk size and one SHA-256 per chunk. Its [`FileId`] is
//! SHA-256 over those (not the name), so the same bytes registered twice are one file.
//! Downloaders check the manifest against the ID they asked for ([`Manifest::verify`]) and
//! every chunk against its hash before using it.
//!
//! # Limits
//!
//! Frames: [`MAX_FRAME`] (9 MiB) on control and tracker channels, [`MAX_PEER_FRAME`] (64 KiB)
//! from peers, and [`MAX_HELLO_FRAME`] (8 KiB) for the first frame of a tracker or peer
//! connection until its hello is accepted. A frame's buffer grows as its bytes arrive, never
//! to the announced length up front. Servers cap connections in all and per address
//! (`p2p-service`'s `ConnectionCaps`) and close a connection that sends no hello within 10 s. Chunks: [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`], at most [`MAX_CHUNKS`] per file.
//! Names: one path component of at most 255 bytes, no separators or control characters
//! ([`validate_name`]).

mod bitfield;
mod collection;
pub mod frame;
mod ids;
mod manifest;
mod msg;
pub mod secure;

pub use bitfield::{format_ranges, Bitfield, InvalidBitfield, SPELLED_RUN};
pub use collection::{
    validate_path, Collection, CollectionError, Entry, Pack, MAX_ENTRIES, MAX_PATH_LEN, PACK_MAX,
};
pub use frame::{FrameError, FrameReader, FrameWriter, MAX_FRAME, MAX_HELLO_FRAME, MAX_PEER_FRAME};
pub use ids::{is_hex_prefix, to_hex, FileId, PeerId};
pub use manifest::{
    auto_chunk_size, chunk_count, sha256, validate_chunk_size, validate_name, ChunkHash, Hashes,
    Manifest, ManifestBuilder, ManifestError, HASH_LEN, MAX_AUTO_CHUNK_SIZE, MAX_CHUNKS,
    MAX_CHUNK_SIZE, MAX_INDEX_SIZE, MAX_NAME_LEN, MIN_CHUNK_SIZE,
};
pub use msg::*;

/// The agent string sent in hellos: crate name and version.
pub fn agent(program: &str) -> String {
    format!("{program}/{}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, encode_frame};
    use proptest::prelude::*;

    fn round_trip<T>(msg: &T)
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let mut buf = Vec::new();
        encode_frame(msg, &mut buf).unwrap();
        let (back, used) = decode_frame::<T>(&buf, MAX_FRAME).unwrap().unwrap();
        assert_eq!(&back, msg);
        assert_eq!(used, buf.len());
    }

    fn summary() -> FileSummary {
        FileSummary {
            collection: false,
            id: FileId([3; 32]),
            name: "doug.png".into(),
            size: 107_330,
            chunk_size: 16384,
            chunks: 7,
            seeders: 2,
            holders: 3,
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            collection: false,
            name: "doug.png".into(),
            size: 3000,
            chunk_size: 1024,
            hashes: vec![9; 96].into(),
        }
    }

    fn info() -> DaemonInfo {
        DaemonInfo {
            peer_id: PeerId([1; 16]),
            listen: "127.0.0.1:7001".parse().unwrap(),
            tracker: "127.0.0.1:7000".into(),
            download_dir: "/tmp/x".into(),
            agent: agent("p2pd"),
            key: Some("ab".repeat(32)),
            closed: true,
            metrics: Some("127.0.0.1:9100".parse().unwrap()),
        }
    }

    #[test]
    fn a_plain_register_is_encoded_as_before_members_and_old_requests_decode() {
        #[derive(serde::Serialize, serde::Deserialize)]
        enum Old {
            Register { manifest: Manifest },
        }
        let (mut old, mut new) = (Vec::new(), Vec::new());
        let sent = manifest();
        encode_frame(&Old::Register { manifest: sent.clone() }, &mut old).unwrap();
        let plain = TrackerRequest::Register {
            manifest: sent.clone(),
            member: false,
        };
        encode_frame(&plain, &mut new).unwrap();
        assert_eq!(old, new, "a plain register must not change on the wire");
        let (back, _) = decode_frame::<TrackerRequest>(&old, MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(back, plain);
        // An older tracker reads a member's register as a plain one.
        let mut member = Vec::new();
        let m = TrackerRequest::Register {
            manifest: sent,
            member: true,
        };
        encode_frame(&m, &mut member).unwrap();
        assert_ne!(member, old);
        let (Old::Register { manifest: seen }, _) =
            decode_frame::<Old>(&member, MAX_FRAME).unwrap().unwrap();
        assert_eq!(seen, manifest());
    }

    #[test]
    fn list_paging_stays_compatible_and_pages_fit_a_frame() {
        // A welcome from a tracker before paging: decodes, and says it does not page.
        #[derive(serde::Serialize)]
        enum Old {
            Welcome {
                version: u32,
                addr: std::net::SocketAddr,
                heartbeat_ms: u64,
                ttl_ms: u64,
            },
        }
        let mut buf = Vec::new();
        encode_frame(
            &Old::Welcome {
                version: 1,
                addr: "127.0.0.1:1".parse().unwrap(),
                heartbeat_ms: 1,
                ttl_ms: 3,
            },
            &mut buf,
        )
        .unwrap();
        let (back, _) = decode_frame::<TrackerResponse>(&buf, MAX_FRAME)
            .unwrap()
            .unwrap();
        assert!(matches!(
            back,
            TrackerResponse::Welcome {
                list_pages: false,
                ..
            }
        ));
        // The largest page and the largest unpaged answer, with the longest names.
        let file = |i: u32| FileSummary {
            collection: false,
            id: FileId([0xab; 32]),
            name: format!("{i:0>255}"),
            size: u64::MAX,
            chunk_size: u32::MAX,
            chunks: u32::MAX,
            seeders: u32::MAX,
            holders: u32::MAX,
        };
        let page = TrackerResponse::FilePage {
            files: (0..LIST_PAGE_MAX).map(file).collect(),
            next: Some(ListCursor {
                name: "x".repeat(255),
                id: FileId([0xab; 32]),
            }),
        };
        let mut buf = Vec::new();
        encode_frame(&page, &mut buf).unwrap();
        assert!(buf.len() < MAX_FRAME / 16, "{} bytes", buf.len());
        let all = TrackerResponse::Files {
            files: (0..LIST_UNPAGED_MAX as u32).map(file).collect(),
        };
        buf.clear();
        encode_frame(&all, &mut buf).unwrap();
        assert!(buf.len() < MAX_FRAME, "{} bytes", buf.len());
    }

    #[test]
    fn every_tracker_message_round_trips() {
        let fid = FileId([5; 32]);
        for m in [
            TrackerRequest::Hello {
                version: PROTOCOL_VERSION,
                listen: "0.0.0.0:7001".parse().unwrap(),
                agent: agent("p2pd"),
            },
            TrackerRequest::Register {
                manifest: manifest(),
                member: false,
            },
            TrackerRequest::Register {
                manifest: manifest(),
                member: true,
            },
            TrackerRequest::Have {
                file_id: fid,
                chunks: Bitfield::full(9),
            },
            TrackerRequest::Gained {
                file_id: fid,
                indices: vec![1, 2],
            },
            TrackerRequest::Drop { file_id: fid },
            TrackerRequest::List,
            TrackerRequest::Find {
                query: "doug".into(),
            },
            TrackerRequest::GetManifest { file_id: fid },
            TrackerRequest::Locate {
                file_id: fid,
                max: 50,
                brief: true,
            },
            TrackerRequest::Heartbeat,
            TrackerRequest::Bye,
            TrackerRequest::Stats,
            TrackerRequest::ListPage {
                after: None,
                limit: 10,
            },
            TrackerRequest::ListPage {
                after: Some(ListCursor {
                    name: "a".into(),
                    id: fid,
                }),
                limit: 10,
            },
        ] {
            round_trip(&m);
        }
        for m in [
            TrackerResponse::Welcome {
                version: 1,
                addr: "127.0.0.1:1".parse().unwrap(),
                heartbeat_ms: 1000,
                ttl_ms: 3000,
                list_pages: true,
            },
            TrackerResponse::Ok,
            TrackerResponse::FilePage {
                files: vec![summary()],
                next: Some(ListCursor {
                    name: "doug.png".into(),
                    id: FileId([3; 32]),
                }),
            },
            TrackerResponse::Registered { file: summary() },
            TrackerResponse::Files {
                files: vec![summary()],
            },
            TrackerResponse::Manifest {
                manifest: manifest(),
            },
            TrackerResponse::Holders {
                file: summary(),
                holders: vec![Holder {
                    peer_id: PeerId([2; 16]),
                    addr: "[::1]:5".parse().unwrap(),
                    chunks: Bitfield::new(7),
                    complete: false,
                }],
            },
            TrackerResponse::Stats(TrackerStats::default()),
            TrackerResponse::Error(WireError::new(ErrorCode::NotFound, "no such file")),
        ] {
            round_trip(&m);
        }
    }

    #[test]
    fn every_peer_message_round_trips() {
        for m in [
            PeerRequest::Hello {
                version: 1,
                peer_id: PeerId([1; 16]),
                agent: "x".into(),
            },
            PeerRequest::GetChunk {
                file_id: FileId([1; 32]),
                index: 4,
            },
            PeerRequest::GetHave {
                file_id: FileId([1; 32]),
            },
            PeerRequest::Watch {
                file_id: FileId([2; 32]),
            },
        ] {
            round_trip(&m);
        }
        for m in [
            PeerResponse::Welcome {
                version: 1,
                peer_id: PeerId([1; 16]),
                pushes: true,
            },
            PeerResponse::Gained {
                file_id: FileId([1; 32]),
                indices: vec![0, 7, 4_000_000],
            },
            PeerResponse::Chunk { index: 3, len: 99 },
            PeerResponse::Have {
                chunks: Bitfield::full(3),
            },
            PeerResponse::Error(WireError::new(ErrorCode::Busy, "busy")),
        ] {
            round_trip(&m);
        }
    }

    #[test]
    fn a_full_gained_push_fits_a_peer_frame_and_old_welcomes_say_no_pushes() {
        let push = PeerResponse::Gained {
            file_id: FileId([0xff; 32]),
            indices: vec![u32::MAX; MAX_GAINED],
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&push, &mut bytes).unwrap();
        assert!(bytes.len() + 4 <= MAX_PEER_FRAME, "{} bytes", bytes.len());
        // A welcome from a daemon before pushes has no `pushes` field.
        #[derive(serde::Serialize)]
        enum Old {
            Welcome { version: u32, peer_id: PeerId },
        }
        let mut old = Vec::new();
        ciborium::into_writer(
            &Old::Welcome {
                version: 2,
                peer_id: PeerId([3; 16]),
            },
            &mut old,
        )
        .unwrap();
        let decoded: PeerResponse = ciborium::from_reader(&old[..]).unwrap();
        assert_eq!(
            decoded,
            PeerResponse::Welcome {
                version: 2,
                peer_id: PeerId([3; 16]),
                pushes: false
            }
        );
    }

    #[test]
    fn every_control_message_round_trips() {
        for m in [
            CtlRequest::Hello {
                version: 1,
                agent: "p2pctl".into(),
            },
            CtlRequest::Register {
                path: "/a/b".into(),
                chunk_size: None,
            },
            CtlRequest::Download {
                query: "doug.png".into(),
                output: Some("/tmp".into()),
                follow: true,
            },
            CtlRequest::List,
            CtlRequest::Locate { query: "x".into() },
            CtlRequest::Status,
            CtlRequest::Quit,
            CtlRequest::Pause { query: "a".into() },
            CtlRequest::Resume { query: "a".into() },
            CtlRequest::Cancel { query: "a".into() },
            CtlRequest::Unregister { query: "a".into() },
        ] {
            round_trip(&m);
        }
        let status = StatusReport {
            collections: Vec::new(),
            info: info(),
            tracker_connected: true,
            tracker_problem: None,
            shares: vec![ShareStatus {
                id: FileId([1; 32]),
                name: "a".into(),
                size: 1,
                chunks: 1,
                path: "/a".into(),
                uploaded: 0,
                problem: None,
            }],
            downloads: vec![DownloadStatus {
                id: FileId([1; 32]),
                name: "a".into(),
                size: 1,
                output: "/b".into(),
                state: DownloadState::Failed("disk full".into()),
                chunks: 1,
                have: 0,
                downloaded: 0,
                wasted: 0,
                peers: 0,
                rate: 0,
                stalled: 1,
                blocked: Some("no space left on device at /x (needs 1.0 MiB more)".into()),
                resumed_with: 0,
                refetched: 0,
            }],
        };
        for m in [
            CtlResponse::Welcome {
                version: 1,
                info: info(),
            },
            CtlResponse::Hashing { done: 1, total: 2 },
            CtlResponse::Registered {
                collection: None,
                file: summary(),
                path: "/a".into(),
            },
            CtlResponse::Started {
                file: summary(),
                output: "/o".into(),
                have: 0,
            },
            CtlResponse::Chunk {
                index: 1,
                total: 7,
                from: "127.0.0.1:9".parse().unwrap(),
                have: 2,
            },
            CtlResponse::Completed {
                file: summary(),
                output: "/o".into(),
                peers: 2,
            },
            CtlResponse::Files { files: vec![] },
            CtlResponse::Located {
                file: summary(),
                holders: vec![],
            },
            CtlResponse::Status(status),
            CtlResponse::Ok,
            CtlResponse::Updated { file: summary() },
            CtlResponse::Ambiguous {
                query: "a".into(),
                candidates: vec![summary()],
            },
            CtlResponse::Error(WireError::new(ErrorCode::Io, "x")),
        ] {
            round_trip(&m);
        }
    }

    #[test]
    fn manifest_hashes_travel_as_bytes() {
        let mut m = manifest();
        m.hashes = vec![7; 32 * 1000].into();
        let mut buf = Vec::new();
        encode_frame(&TrackerResponse::Manifest { manifest: m }, &mut buf).unwrap();
        assert!(buf.len() < 32 * 1000 + 100, "{} bytes", buf.len());
    }

    proptest! {
        // Arbitrary bytes never panic any decoder: they decode or fail cleanly.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<TrackerRequest>(&bytes, MAX_FRAME);
            let _ = decode_frame::<TrackerResponse>(&bytes, MAX_FRAME);
            let _ = decode_frame::<PeerRequest>(&bytes, MAX_PEER_FRAME);
            let _ = decode_frame::<PeerResponse>(&bytes, MAX_PEER_FRAME);
            let _ = decode_frame::<CtlRequest>(&bytes, MAX_FRAME);
            let _ = decode_frame::<CtlResponse>(&bytes, MAX_FRAME);
        }

        // Corrupting one byte of a valid frame never panics either.
        #[test]
        fn mutated_frames_never_panic(pos in 0usize..200, byte in any::<u8>()) {
            let mut buf = Vec::new();
            encode_frame(
                &TrackerRequest::Register {
                    manifest: manifest(),
                    member: false,
                },
                &mut buf,
            )
            .unwrap();
            let i = pos % buf.len();
            buf[i] = byte;
            if let Ok(Some((TrackerRequest::Register { manifest, .. }, _))) =
                decode_frame::<TrackerRequest>(&buf, MAX_FRAME)
            {
                let _ = manifest.validate();
                let _ = manifest.chunk_count();
                let _ = manifest.hash(u32::MAX);
            }
        }

        #[test]
        fn bitfield_round_trips(len in 0u32..2000, seed in any::<u64>()) {
            let mut b = Bitfield::new(len);
            let mut x = seed | 1;
            for _ in 0..len / 3 {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                b.set((x % u64::from(len.max(1))) as u32);
            }
            let mut buf = Vec::new();
            encode_frame(&b, &mut buf).unwrap();
            let (back, _) = decode_frame::<Bitfield>(&buf, MAX_FRAME).unwrap().unwrap();
            prop_assert_eq!(back.clone().checked(len), Some(b.clone()));
            prop_assert_eq!(back.count(), b.iter().count() as u32);
        }
    }
}
