//! Crowds: leechers feed each other, what a peer gains is pushed to those watching it, and
//! the metrics say so (real processes on loopback).

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use p2p_schema::frame::encode_frame;
use p2p_schema::{Bitfield, FileId, PeerId, PeerRequest, PeerResponse, PROTOCOL_VERSION};
use p2p_tests::fake::read_frame;
use p2p_tests::{eventually, file_sha256, write_random, Swarm};

const METRICS: [&str; 2] = ["--metrics", "127.0.0.1:0"];

fn send(s: &mut TcpStream, msg: &PeerRequest) {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf).expect("encoding");
    s.write_all(&buf).expect("sending");
}

fn file_series(name: &str, id: &str) -> String {
    format!("{name}{{file=\"{id}\"}}")
}

#[test]
fn a_capped_seeder_crowd_of_twenty_is_fed_mostly_by_its_leechers() {
    const LEECHERS: usize = 19;
    const SIZE: usize = 8 << 20;
    // The seeder alone would need 19 x 8 MiB / 2 MB/s = 80 s to serve everyone.
    let mut swarm = Swarm::new(0, "30s", &[]);
    swarm.add_daemon(&["--metrics", "127.0.0.1:0", "--upload-rate", "2000000"]);
    for _ in 0..LEECHERS {
        swarm.add_daemon(&METRICS);
    }
    let source = swarm.path("crowd.bin");
    write_random(&source, SIZE, 2000);
    let seeder = &swarm.daemons[0];
    let doc = seeder.ctl_json(&[
        "register",
        source.to_str().unwrap(),
        "--chunk-size",
        "262144",
    ]);
    let id = doc["file"]["id"].as_str().expect("file id").to_string();
    let leechers = &swarm.daemons[1..];
    for (i, l) in leechers.iter().enumerate() {
        let out = swarm.path(&format!("out{i}.bin"));
        l.ctl(&["download", &id, "-o", out.to_str().unwrap(), "--detach"])
            .ok();
    }
    for l in leechers {
        l.wait_complete(Duration::from_secs(120));
    }
    let want = file_sha256(&source);
    for i in 0..LEECHERS {
        let out = swarm.path(&format!("out{i}.bin"));
        assert_eq!(file_sha256(&out), want, "leecher {i}");
    }

    // Every leecher received the file once, verified; the seeder sent under half of it all.
    let size = SIZE as f64;
    let chunks = (SIZE / 262_144) as f64;
    let mut pushes_received = 0.0;
    let mut sent_by_leechers = 0.0;
    for (i, l) in leechers.iter().enumerate() {
        let m = l.metrics();
        let status = l.status();
        let dl = &status["downloads"][0];
        let received = m.value(&file_series("p2pd_received_bytes_total", &id));
        assert_eq!(received, size, "leecher {i}");
        assert_eq!(
            Some(received),
            dl["downloaded"].as_f64(),
            "leecher {i}: the metrics and status disagree"
        );
        assert_eq!(m.value("p2pd_chunks_verified_total"), chunks, "leecher {i}");
        assert_eq!(m.value("p2pd_chunks_rejected_total"), 0.0, "leecher {i}");
        assert_eq!(m.value("p2pd_downloads{state=\"complete\"}"), 1.0);
        assert_eq!(m.value("p2pd_downloads{state=\"running\"}"), 0.0);
        pushes_received += m
            .get("p2pd_have_pushes_total{direction=\"out\"}")
            .unwrap_or(0.0);
        sent_by_leechers += m
            .get(&file_series("p2pd_sent_bytes_total", &id))
            .unwrap_or(0.0);
    }
    let m = seeder.metrics();
    let seeder_sent = m.value(&file_series("p2pd_sent_bytes_total", &id));
    let status = seeder.status();
    assert_eq!(
        Some(seeder_sent),
        status["shares"][0]["uploaded"].as_f64(),
        "the seeder's metrics and status disagree"
    );
    assert_eq!(m.value("p2pd_shares"), 1.0);
    let total = LEECHERS as f64 * size;
    eprintln!(
        "the seeder sent {:.2} copies of {LEECHERS}; leechers sent {:.2}; {pushes_received} pushes taken in",
        seeder_sent / size,
        sent_by_leechers / size
    );
    assert!(
        seeder_sent < total / 2.0,
        "the seeder sent {seeder_sent} of {total} bytes: the leechers did not feed each other"
    );
    assert!(
        sent_by_leechers + seeder_sent >= total,
        "bytes sent ({sent_by_leechers} + {seeder_sent}) do not cover those received ({total})"
    );
    assert!(
        pushes_received > 0.0,
        "no leecher learned anything by a push"
    );
}

#[test]
fn what_a_peer_gains_is_pushed_to_a_watcher_that_never_asks_the_tracker() {
    const SIZE: usize = 4 << 20;
    let mut swarm = Swarm::new(1, "30s", &["--upload-rate", "1000000"]);
    swarm.add_daemon(&METRICS);
    let (a, b) = (&swarm.daemons[0], &swarm.daemons[1]);
    let source = swarm.path("pushed.bin");
    write_random(&source, SIZE, 2001);
    let doc = a.ctl_json(&[
        "register",
        source.to_str().unwrap(),
        "--chunk-size",
        "65536",
    ]);
    let id = doc["file"]["id"].as_str().expect("file id").to_string();
    let chunks = (SIZE / 65_536) as u32;
    let out = swarm.path("pushed-b.bin");
    b.ctl(&["download", &id, "-o", out.to_str().unwrap(), "--detach"])
        .ok();
    // b holds some of it and is still fetching (a sends about 15 chunks a second).
    let had = b.wait_have(1);
    assert!(
        had < u64::from(chunks),
        "b finished before it could be watched"
    );

    // We watch b's copy over the peer channel: no tracker is ever asked.
    let mut conn = TcpStream::connect(b.addr).expect("connecting to b");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    send(
        &mut conn,
        &PeerRequest::Hello {
            version: PROTOCOL_VERSION,
            peer_id: PeerId([0x5a; 16]),
            agent: "watcher".into(),
        },
    );
    match read_frame::<PeerResponse>(&mut conn).expect("welcome") {
        Some(PeerResponse::Welcome { pushes: true, .. }) => {}
        other => panic!("b does not offer pushes: {other:?}"),
    }
    let file_id: FileId = id.parse().expect("file id");
    send(&mut conn, &PeerRequest::Watch { file_id });
    let mut known = match read_frame::<PeerResponse>(&mut conn).expect("have") {
        Some(PeerResponse::Have { chunks: have }) => have,
        other => panic!("no answer to watch: {other:?}"),
    };
    let at_first = known.count();
    assert!(at_first < chunks, "b held everything before the watch");
    let mut pushes = 0;
    while known.count() < chunks {
        match read_frame::<PeerResponse>(&mut conn).expect("a push") {
            Some(PeerResponse::Gained {
                file_id: f,
                indices,
            }) => {
                assert_eq!(f, file_id);
                assert!(!indices.is_empty(), "an empty push");
                for i in indices {
                    assert!(known.set(i), "chunk {i} pushed twice");
                }
                pushes += 1;
            }
            other => panic!("unexpected message while watching: {other:?}"),
        }
    }
    assert_eq!(known, Bitfield::full(chunks));
    assert!(pushes >= 1);
    b.wait_complete(Duration::from_secs(60));
    assert_eq!(file_sha256(&out), file_sha256(&source));
    // b counted what it pushed to us (and to no one else: a is the only other peer, a seeder).
    let counted = eventually(Duration::from_secs(5), || {
        let n = b
            .metrics()
            .get("p2pd_have_pushes_total{direction=\"in\"}")?;
        (n >= f64::from(pushes)).then_some(n)
    });
    assert!(counted.is_some(), "b's metrics do not count its pushes");
    eprintln!("watched from {at_first} of {chunks} chunks: {pushes} pushes");
}
