use super::*;
use tokio::io::{duplex, split};

async fn pair(
    client_secret: Option<&str>,
    server_secret: Option<&str>,
    pinned: Option<[u8; 32]>,
) -> (
    Result<Session, HandshakeError>,
    Result<Session, HandshakeError>,
    Keypair,
    Keypair,
) {
    let (mut a, mut b) = duplex(1 << 20);
    let (ka, kb) = (Keypair::generate().unwrap(), Keypair::generate().unwrap());
    let sa = client_secret.map(SwarmKey::from_secret);
    let sb = server_secret.map(SwarmKey::from_secret);
    // Each side closes its end when its handshake ends, as a real connection would.
    let (ra, rb) = tokio::join!(
        async {
            let r = connect(&mut a, &ka, sa.as_ref(), pinned.as_ref()).await;
            drop(a);
            r
        },
        async {
            let r = accept(&mut b, &kb, sb.as_ref()).await;
            drop(b);
            r
        }
    );
    (ra, rb, ka, kb)
}

#[tokio::test]
async fn both_sides_learn_the_others_key_in_open_and_closed_swarms() {
    for secret in [None, Some("s3cret")] {
        let (a, b, ka, kb) = pair(secret, secret, None).await;
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.remote_key(), kb.public());
        assert_eq!(b.remote_key(), ka.public());
        assert_eq!(b.remote_peer_id(), ka.peer_id());
    }
}

#[tokio::test]
async fn a_wrong_or_missing_secret_is_refused_with_its_reason() {
    let (a, b, ..) = pair(Some("one"), Some("two"), None).await;
    assert!(
        matches!(a, Err(HandshakeError::Refused(Refusal::WrongSecret))),
        "{a:?}"
    );
    assert!(
        matches!(b, Err(HandshakeError::WeRefused(Refusal::WrongSecret))),
        "{b:?}"
    );
    let (a, ..) = pair(None, Some("two"), None).await;
    assert!(
        matches!(a, Err(HandshakeError::Refused(Refusal::SecretRequired))),
        "{a:?}"
    );
    let (a, ..) = pair(Some("one"), None, None).await;
    assert!(
        matches!(a, Err(HandshakeError::Refused(Refusal::NotClosed))),
        "{a:?}"
    );
}

#[tokio::test]
async fn a_pinned_key_that_does_not_match_stops_the_handshake() {
    let (a, b, ..) = pair(None, None, Some([7; 32])).await;
    assert!(
        matches!(a, Err(HandshakeError::KeyMismatch { .. })),
        "{a:?}"
    );
    assert!(b.is_err(), "the responder must not complete either");
}

#[tokio::test]
async fn a_plain_frame_first_is_an_earlier_version() {
    let (mut a, mut b) = duplex(1 << 16);
    a.write_all(&[0, 0, 0, 40, 0xa1]).await.unwrap();
    let kb = Keypair::generate().unwrap();
    match accept(&mut b, &kb, None).await {
        Err(HandshakeError::EarlierVersion { first }) => assert_eq!(first, [0, 0, 0, 40]),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn the_stream_carries_large_and_small_writes_intact_and_encrypted() {
    let (a, b) = duplex(1 << 20);
    let (ka, kb) = (Keypair::generate().unwrap(), Keypair::generate().unwrap());
    let (mut a, mut b) = (a, b);
    let key = SwarmKey::from_secret("x");
    let (sa, sb) = tokio::join!(
        connect(&mut a, &ka, Some(&key), None),
        accept(&mut b, &kb, Some(&key))
    );
    let (ar, aw) = split(a);
    let (br, bw) = split(b);
    let (_ar, mut aw) = sa.unwrap().into_stream(ar, aw);
    let (mut br, _bw) = sb.unwrap().into_stream(br, bw);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let writer = async {
        aw.write_all(&data[..10]).await.unwrap();
        aw.write_all(&data[10..]).await.unwrap();
        aw.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let reader = async { br.read_to_end(&mut got).await.unwrap() };
    tokio::join!(writer, reader);
    assert_eq!(got, data);
}

#[tokio::test]
async fn a_tampered_record_is_an_error_not_data() {
    let (mut a, mut b) = duplex(1 << 20);
    let (ka, kb) = (Keypair::generate().unwrap(), Keypair::generate().unwrap());
    let (sa, sb) = tokio::join!(connect(&mut a, &ka, None, None), accept(&mut b, &kb, None));
    let (sa, sb) = (sa.unwrap(), sb.unwrap());
    // Seal one record by hand, flip a bit, and feed it to the reader.
    let mut sealed = vec![0u8; 64];
    let n = sa
        .transport
        .write_message(1, b"hello", &mut sealed)
        .unwrap();
    sealed[3] ^= 1;
    let mut record = (n as u16).to_be_bytes().to_vec();
    record.extend_from_slice(&sealed[..n]);
    let (mut br, _bw) = sb.into_stream(&record[..], tokio::io::sink());
    let mut out = Vec::new();
    let e = br.read_to_end(&mut out).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(out.is_empty());
}

#[test]
fn keys_round_trip_and_debug_hides_secrets() {
    let k = Keypair::generate().unwrap();
    let back = Keypair::from_private(k.private()).unwrap();
    assert_eq!(back.public(), k.public());
    assert_eq!(back.peer_id(), k.peer_id());
    let shown = format!("{k:?} {:?}", SwarmKey::from_secret("hunter2"));
    assert!(!shown.contains(&hex::encode(k.private())));
    assert!(!shown.contains("hunter2"));
}

#[tokio::test]
async fn records_split_across_reads_are_reassembled_for_small_and_large_reads() {
    // A pipe of 7 bytes: every record arrives in many pieces, its length bytes too.
    for read_size in [5usize, 100_000] {
        let (mut a, mut b) = duplex(7);
        let (ka, kb) = (Keypair::generate().unwrap(), Keypair::generate().unwrap());
        let (sa, sb) = tokio::join!(connect(&mut a, &ka, None, None), accept(&mut b, &kb, None));
        let (ar, aw) = split(a);
        let (br, bw) = split(b);
        let (_ar, mut aw) = sa.unwrap().into_stream(ar, aw);
        let (mut br, _bw) = sb.unwrap().into_stream(br, bw);
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 253) as u8).collect();
        let writer = async {
            for piece in data.chunks(70_001) {
                aw.write_all(piece).await.unwrap();
            }
            aw.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let reader = async {
            let mut buf = vec![0u8; read_size];
            loop {
                let n = br.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::join!(writer, reader);
        assert_eq!(got, data, "reads of {read_size}");
    }
}
