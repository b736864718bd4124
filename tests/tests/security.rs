//! Closed swarms and identities (see SECURITY.md): outsiders get nothing, the secret never
//! crosses the wire or reaches a log, peer IDs cannot be taken over, announced addresses are
//! checked, refusals are clear, keys last, earlier versions are told to upgrade.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use p2p_schema::frame::encode_frame;
use p2p_schema::secure::{HandshakeError, Refusal};
use p2p_schema::{
    ErrorCode, FileId, PeerId, PeerRequest, PeerResponse, TrackerRequest, TrackerResponse,
    PROTOCOL_VERSION,
};
use p2p_tests::fake::read_frame;
use p2p_tests::proxy::{contains, RecordingProxy};
use p2p_tests::secure::{self, SecureConn};
use p2p_tests::{bin, eventually, file_sha256, sample, Daemon, Tracker, STARTUP};

const SECRET: &str = "correct-horse-battery-staple-7f3a9c";

/// A tracker and `n` daemons of a closed swarm (the secret in a file), with extra daemon flags.
struct Closed {
    dir: tempfile::TempDir,
    secret_file: String,
    tracker: Tracker,
    daemons: Vec<Daemon>,
}

impl Closed {
    fn new(n: usize, tracker_extra: &[&str]) -> Closed {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        let secret_file = secret_file.to_str().unwrap().to_string();
        let mut flags = vec!["--secret-file", &secret_file, "--log-level", "trace"];
        flags.extend_from_slice(tracker_extra);
        let tracker = Tracker::start_on(&dir.path().join("tracker"), "30s", "127.0.0.1:0", &flags);
        let mut closed = Closed {
            dir,
            secret_file,
            tracker,
            daemons: Vec::new(),
        };
        for _ in 0..n {
            closed.add(&[]);
        }
        closed
    }

    /// One more member serving on `listen`, connected to `tracker` (the real one unless a
    /// proxy is given).
    fn add_via(&mut self, tracker: SocketAddr, listen: &str, extra: &[&str]) -> &Daemon {
        let i = self.daemons.len();
        let data = self.dir.path().join(format!("member{i}"));
        let mut flags = vec!["--secret-file", &self.secret_file, "--log-level", "trace"];
        flags.extend_from_slice(extra);
        self.daemons
            .push(Daemon::start_in(&[], listen, &data, tracker, &flags));
        &self.daemons[i]
    }

    fn add(&mut self, extra: &[&str]) -> &Daemon {
        self.add_via(self.tracker.addr, "127.0.0.1:0", extra)
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

fn frame<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf).unwrap();
    buf
}

/// A plain connection that says a version-2 hello as `peer_id`, then asks for chunk 0 of
/// `file`: what an outsider that learned an ID would try. Returns every answer until close.
fn plain_chunk_request(addr: SocketAddr, peer_id: PeerId, file: FileId) -> Vec<PeerResponse> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut out = frame(&PeerRequest::Hello {
        version: PROTOCOL_VERSION,
        peer_id,
        agent: "outsider".into(),
    });
    out.extend(frame(&PeerRequest::GetChunk {
        file_id: file,
        index: 0,
    }));
    let _ = s.write_all(&out);
    let mut answers = Vec::new();
    while let Ok(Some(a)) = read_frame::<PeerResponse>(&mut s) {
        let chunk = matches!(a, PeerResponse::Chunk { .. });
        answers.push(a);
        if chunk {
            break;
        }
    }
    answers
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// One answer, and it is an `Unauthorized` refusal.
fn refused_only(answers: &[PeerResponse]) -> bool {
    matches!(answers, [PeerResponse::Error(e)] if e.code == ErrorCode::Unauthorized)
}

fn peer_id_of(d: &Daemon) -> PeerId {
    let hex = d.status()["info"]["peer_id"].as_str().unwrap().to_string();
    let bytes = hex_decode(&hex);
    PeerId(bytes.try_into().unwrap())
}

fn file_id(hex: &str) -> FileId {
    FileId(hex_decode(hex).try_into().unwrap())
}

fn refusal(r: Result<SecureConn, HandshakeError>) -> Refusal {
    match r {
        Err(HandshakeError::Refused(why)) => why,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("an outsider completed the handshake"),
    }
}

#[test]
fn an_outsider_without_the_secret_gets_nothing_and_members_are_served_meanwhile() {
    let mut swarm = Closed::new(2, &[]);
    let file = swarm.path("closed.bin");
    p2p_tests::write_random(&file, 3 << 20, 21);
    let id = swarm.daemons[0].register(&file);
    let seeder = swarm.daemons[0].addr;
    let stolen = peer_id_of(&swarm.daemons[1]);

    // The peer channel: a plain hello, with a random or a member's (stolen) peer ID, gets one
    // refusal and a close; no chunk, no have.
    for claimed in [PeerId::random(), stolen] {
        let answers = plain_chunk_request(seeder, claimed, file_id(&id));
        assert!(refused_only(&answers), "an outsider got {answers:?}");
    }
    // A secure handshake without the secret, or with a wrong one, is refused.
    assert_eq!(
        refusal(secure::connect(seeder, None, None)),
        Refusal::SecretRequired
    );
    assert_eq!(
        refusal(secure::connect(seeder, None, Some("guess"))),
        Refusal::WrongSecret
    );

    // The tracker: the same, and no counters either.
    let tracker = swarm.tracker.addr;
    assert_eq!(
        refusal(secure::connect(tracker, None, None)),
        Refusal::SecretRequired
    );
    assert_eq!(
        refusal(secure::connect(tracker, None, Some("guess"))),
        Refusal::WrongSecret
    );
    let stats = |extra: &[&str]| {
        std::process::Command::new(bin("p2p-tracker"))
            .args(["stats", "--tracker", &tracker.to_string()])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = stats(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tracker refused us"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("files"));
    let out = stats(&["--secret-file", &swarm.secret_file]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("files: 1"));

    // Members are served meanwhile, and the refusals were logged on the refusing side.
    let got = swarm.path("got.bin");
    swarm.add(&[]);
    swarm.daemons[2]
        .ctl(&["download", &id, "-o", got.to_str().unwrap()])
        .ok();
    assert_eq!(file_sha256(&got), file_sha256(&file));
    assert!(swarm.daemons[0].proc.log().contains("refused a"));
    assert!(swarm.tracker.proc.log().contains("refused a session"));
}

#[test]
fn the_secret_and_the_chunks_never_cross_the_wire_in_the_clear_nor_reach_a_log() {
    let mut swarm = Closed::new(0, &[]);
    // Every byte between the daemons and the tracker, and between the two daemons, passes a
    // recording proxy: the seeder listens on a port of ours and advertises the proxy's.
    let to_tracker = RecordingProxy::start(swarm.tracker.addr);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let seeder_at: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let to_seeder = RecordingProxy::start(seeder_at);
    let advertise = to_seeder.addr.to_string();
    let listen = seeder_at.to_string();
    swarm.add_via(to_tracker.addr, &listen, &["--advertise", &advertise]);
    swarm.add_via(to_tracker.addr, "127.0.0.1:0", &[]);

    let file = swarm.path("secret-data.bin");
    p2p_tests::write_random(&file, 2 << 20, 5);
    let id = swarm.daemons[0].register(&file);
    let got = swarm.path("got.bin");
    swarm.daemons[1]
        .ctl(&["download", &id, "-o", got.to_str().unwrap()])
        .ok();
    assert_eq!(file_sha256(&got), file_sha256(&file));

    let data = std::fs::read(&file).unwrap();
    for (name, wire) in [
        ("tracker", to_tracker.recorded()),
        ("peer", to_seeder.recorded()),
    ] {
        assert!(wire.len() > 1000, "nothing went through the {name} proxy");
        assert!(
            !contains(&wire, SECRET.as_bytes()),
            "the secret crossed the {name} link"
        );
        assert!(
            !contains(&wire, b"secret-data.bin"),
            "a file name crossed the {name} link in the clear"
        );
        for piece in data.chunks(4096).step_by(64) {
            assert!(
                !contains(&wire, &piece[..32]),
                "file bytes crossed the {name} link in the clear"
            );
        }
    }
    assert!(
        to_seeder.recorded().len() > data.len(),
        "the chunks went through the proxy"
    );
    for log in [
        swarm.tracker.proc.log(),
        swarm.daemons[0].proc.log(),
        swarm.daemons[1].proc.log(),
    ] {
        assert!(
            log.contains("TRACE") || log.contains("DEBUG"),
            "logs at trace level"
        );
        assert!(!log.contains(SECRET), "the secret reached a log");
    }
}

/// Says the version-1 hello an earlier daemon sends (plain, with a peer ID and secret of its
/// own choosing), then `after`; returns the first answer.
fn earlier_tracker_hello(
    tracker: SocketAddr,
    peer_id: PeerId,
    after: &[TrackerRequest],
) -> Option<TrackerResponse> {
    /// The hello of protocol version 1, field for field.
    #[derive(serde::Serialize)]
    enum V1 {
        Hello {
            version: u32,
            peer_id: PeerId,
            listen: SocketAddr,
            agent: String,
            secret: Option<String>,
        },
    }
    let mut s = TcpStream::connect(tracker).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut out = frame(&V1::Hello {
        version: 1,
        peer_id,
        listen: "127.0.0.1:9".parse().unwrap(),
        agent: "p2pd/0.1.0".into(),
        secret: None,
    });
    for r in after {
        out.extend(frame(r));
    }
    let _ = s.write_all(&out);
    read_frame::<TrackerResponse>(&mut s).ok().flatten()
}

fn tracker_session(tracker: SocketAddr, listen: &str) -> SecureConn {
    let mut s = secure::connect(tracker, None, None).unwrap();
    s.write_all(&frame(&TrackerRequest::Hello {
        version: PROTOCOL_VERSION,
        listen: listen.parse().unwrap(),
        agent: "test".into(),
    }))
    .unwrap();
    match read_frame::<TrackerResponse>(&mut s).unwrap() {
        Some(TrackerResponse::Welcome { .. }) => s,
        other => panic!("no welcome: {other:?}"),
    }
}

fn holders(d: &Daemon, id: &str) -> Vec<String> {
    let doc = d.ctl_json(&["locate", id]);
    doc["holders"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|h| h["addr"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn an_impostor_with_a_members_peer_id_cannot_change_its_holdings_or_drop_it() {
    let swarm = p2p_tests::Swarm::new(2, "30s", &[]);
    let member = &swarm.daemons[0];
    let id = member.register(&sample("doug.png"));
    let victim = peer_id_of(member);
    let before = holders(&swarm.daemons[1], &id);
    assert_eq!(before, vec![member.addr.to_string()]);

    // The hello of an earlier version, naming the victim, then Drop and Bye: refused.
    let answer = earlier_tracker_hello(
        swarm.tracker.addr,
        victim,
        &[
            TrackerRequest::Drop {
                file_id: file_id(&id),
            },
            TrackerRequest::Bye,
        ],
    );
    match answer {
        Some(TrackerResponse::Error(e)) => assert_eq!(e.code, ErrorCode::UnsupportedVersion),
        other => panic!("an earlier-version hello got {other:?}"),
    }
    // A session of its own: its Drop, empty Have and Bye are its own, not the victim's.
    let mut s = tracker_session(swarm.tracker.addr, "127.0.0.1:9");
    let mut out = frame(&TrackerRequest::Drop {
        file_id: file_id(&id),
    });
    out.extend(frame(&TrackerRequest::Have {
        file_id: file_id(&id),
        chunks: p2p_schema::Bitfield::new(7),
    }));
    out.extend(frame(&TrackerRequest::Bye));
    s.write_all(&out).unwrap();
    for _ in 0..3 {
        let _ = read_frame::<TrackerResponse>(&mut s);
    }
    assert_eq!(
        holders(&swarm.daemons[1], &id),
        before,
        "the victim's holding changed"
    );
    assert!(swarm.daemons[0].status()["tracker_connected"] == true);
}

#[test]
fn an_announced_third_party_address_is_recorded_as_the_sessions_own_in_an_open_swarm() {
    let mut swarm = p2p_tests::Swarm::new(1, "30s", &[]);
    // Announces another host's IP with its own port.
    let i = swarm.add_daemon(&["--advertise", "127.0.0.9:4444"]);
    let id = swarm.daemons[i].register(&sample("doug.png"));
    assert_eq!(
        holders(&swarm.daemons[0], &id),
        vec!["127.0.0.1:4444".to_string()]
    );
    // A tracker told to trust announced addresses records it as given.
    let dir = tempfile::tempdir().unwrap();
    let trusting = Tracker::start_on(
        &dir.path().join("t"),
        "30s",
        "127.0.0.1:0",
        &["--trust-advertised"],
    );
    let d = Daemon::start(
        &dir.path().join("d"),
        trusting.addr,
        &["--advertise", "127.0.0.9:4444"],
    );
    let other = Daemon::start(&dir.path().join("o"), trusting.addr, &[]);
    let id = d.register(&sample("sample.txt"));
    assert_eq!(holders(&other, &id), vec!["127.0.0.9:4444".to_string()]);
}

#[test]
fn a_wrong_or_missing_secret_is_a_clear_one_line_error_not_a_hang() {
    let swarm = Closed::new(0, &[]);
    let wrong = swarm.path("wrong");
    std::fs::write(&wrong, "not-the-secret\n").unwrap();
    let cases = [
        (
            vec!["--secret-file", wrong.to_str().unwrap()],
            "tracker refused us: wrong swarm secret",
        ),
        (vec![], "tracker refused us: this swarm is closed"),
    ];
    for (n, (flags, expected)) in cases.iter().enumerate() {
        let d = Daemon::start_unconnected(&swarm.path(&format!("d{n}")), swarm.tracker.addr, flags);
        let problem = eventually(Duration::from_secs(15), || {
            let s = d.status();
            s["tracker_problem"].as_str().map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no tracker problem shown; log:\n{}", d.proc.log()));
        assert!(problem.contains(expected), "{problem}");
        assert!(!problem.contains('\n'));
        let text = d.ctl(&["status"]).ok();
        assert!(text.contains(expected), "{text}");
        d.proc.wait_for(expected, STARTUP);
    }
    swarm.tracker.proc.wait_for("refused a session", STARTUP);
    // The other way round: a member of a closed swarm reaching an open tracker.
    let dir = tempfile::tempdir().unwrap();
    let open = Tracker::start(&dir.path().join("open"), "30s");
    let d = Daemon::start_unconnected(
        &dir.path().join("d"),
        open.addr,
        &["--secret-file", &swarm.secret_file],
    );
    d.proc.wait_for(
        "tracker refused us: the other side is in an open swarm",
        STARTUP,
    );
}

#[test]
fn keys_survive_restarts_and_a_corrupt_key_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(&dir.path().join("t"), "30s");
    let data = dir.path().join("d");
    let mut d = Daemon::start(&data, tracker.addr, &[]);
    let status = d.status();
    let (peer, key) = (
        status["info"]["peer_id"].clone(),
        status["info"]["key"].clone(),
    );
    assert_eq!(key.as_str().map(str::len), Some(64));
    assert!(d.ctl(&["status"]).ok().contains(key.as_str().unwrap()));
    d.ctl(&["quit"]).ok();
    let _ = d.proc.wait_exit(STARTUP);
    d.restart();
    let again = d.status();
    assert_eq!(
        again["info"]["peer_id"], peer,
        "a restart changed the peer ID"
    );
    assert_eq!(again["info"]["key"], key);
    d.ctl(&["quit"]).ok();
    let _ = d.proc.wait_exit(STARTUP);

    let key_file = data.join("identity.key");
    std::fs::write(&key_file, "p2p identity key v1\nnot-hex\n").unwrap();
    let out = std::process::Command::new(bin("p2pd"))
        .args([
            "--tracker",
            &tracker.addr.to_string(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("identity.key is corrupt"), "{err}");
    assert_eq!(
        err.trim().lines().filter(|l| l.contains("error")).count(),
        1,
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap(),
        "p2p identity key v1\nnot-hex\n"
    );
    // The tracker's key is kept too, and published for pinning.
    let published = std::fs::read_to_string(tracker.data_dir.join("tracker.pub")).unwrap();
    assert_eq!(published.trim().len(), 64);
}

#[test]
fn a_pinned_tracker_key_lets_the_right_tracker_in_and_keeps_another_out() {
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(&dir.path().join("t"), "30s");
    let key = std::fs::read_to_string(tracker.data_dir.join("tracker.pub")).unwrap();
    let key = key.trim();
    let d = Daemon::start(&dir.path().join("d"), tracker.addr, &["--tracker-key", key]);
    assert!(d.status()["tracker_connected"] == true);
    let impostor = Tracker::start(&dir.path().join("other"), "30s");
    let e = Daemon::start_unconnected(
        &dir.path().join("e"),
        impostor.addr,
        &["--tracker-key", key],
    );
    e.proc.wait_for("is not the pinned one", STARTUP);
    assert!(e.status()["tracker_connected"] == false);
}

#[test]
fn daemons_of_the_previous_protocol_version_are_told_to_upgrade() {
    let swarm = p2p_tests::Swarm::new(1, "30s", &[]);
    // To the tracker: an error in the old framing, naming the upgrade.
    match earlier_tracker_hello(swarm.tracker.addr, PeerId::random(), &[]) {
        Some(TrackerResponse::Error(e)) => {
            assert_eq!(e.code, ErrorCode::UnsupportedVersion);
            assert!(e.message.contains("upgrade"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // To a daemon's peer port: the same.
    let mut s = TcpStream::connect(swarm.daemons[0].addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&frame(&PeerRequest::Hello {
        version: 1,
        peer_id: PeerId::random(),
        agent: "p2pd/0.1.0".into(),
    }))
    .unwrap();
    match read_frame::<PeerResponse>(&mut s).unwrap() {
        Some(PeerResponse::Error(e)) => {
            assert_eq!(e.code, ErrorCode::UnsupportedVersion);
            assert!(e.message.contains("upgrade"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // A daemon reaching a tracker of the earlier version (which answers our preamble, read as
    // a frame length, with an error frame) says the tracker must be upgraded.
    let old = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let old_addr = old.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in old.incoming().take(20) {
            let Ok(mut conn) = conn else { continue };
            let e = p2p_schema::WireError::new(
                ErrorCode::BadRequest,
                "frame of 1345466446 bytes exceeds the limit of 8192",
            );
            let _ = conn.write_all(&frame(&TrackerResponse::Error(e)));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_unconnected(&dir.path().join("d"), old_addr, &[]);
    d.proc
        .wait_for("speaks an earlier version of the protocol", STARTUP);
}

#[test]
fn encrypted_links_in_an_open_swarm_carry_files_and_refuse_plain_connections() {
    let swarm = p2p_tests::Swarm::new(2, "30s", &["--encrypt"]);
    let file = swarm.path("encrypted.bin");
    p2p_tests::write_random(&file, 5 << 20, 8);
    let id = swarm.daemons[0].register(&file);
    let got = swarm.path("got.bin");
    swarm.daemons[1]
        .ctl(&["download", &id, "-o", got.to_str().unwrap()])
        .ok();
    assert_eq!(file_sha256(&got), file_sha256(&file));
    // A plain connection is refused; a secure one needs no secret in an open swarm.
    let seeder = swarm.daemons[0].addr;
    let answers = plain_chunk_request(seeder, PeerId::random(), file_id(&id));
    assert!(refused_only(&answers), "a plain connection got {answers:?}");
    assert!(secure::connect(seeder, None, None).is_ok());
}
