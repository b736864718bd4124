//! The session itself: connecting (the secure handshake and the hello), re-announcing what
//! we hold, pipelining calls and heartbeats, and reconnecting with backoff when it drops.

use super::*;

pub(super) async fn session_loop(
    address: String,
    identity: Identity,
    announce: Announce,
    mut calls: mpsc::Receiver<Call>,
    (connected, list_pages, problem): (
        watch::Sender<bool>,
        Arc<AtomicBool>,
        Arc<Mutex<Option<String>>>,
    ),
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        if stop.is_cancelled() {
            return;
        }
        match connect(&address, &identity).await {
            Ok((reader, writer, heartbeat, advertised, pages)) => {
                list_pages.store(pages, Ordering::Relaxed);
                *lock(&problem) = None;
                backoff = Duration::from_millis(100);
                failures = 0;
                let outcome = run_session(
                    (&address, advertised),
                    reader,
                    writer,
                    heartbeat,
                    &announce,
                    &mut calls,
                    &connected,
                    &stop,
                )
                .await;
                let _ = connected.send(false);
                match outcome {
                    SessionEnd::Stopped => return,
                    SessionEnd::Lost(why) => {
                        warn!(tracker = %address, "lost the tracker session: {why}; reconnecting")
                    }
                }
            }
            Err(e) => {
                failures += 1;
                *lock(&problem) = Some(e.message.clone());
                // Say it once loudly, then quietly while it keeps failing. A refusal (a
                // wrong secret or key, another version) is said as such, and retried slowly.
                let refused =
                    e.code == ErrorCode::Unauthorized || e.code == ErrorCode::UnsupportedVersion;
                match (failures, refused) {
                    (1, true) => warn!(tracker = %address, "{e}; retrying every 30 s"),
                    (1, false) => {
                        warn!(tracker = %address, "cannot reach the tracker: {e}; retrying")
                    }
                    _ => debug!(tracker = %address, "tracker session not opened: {e}"),
                }
                if refused {
                    backoff = Duration::from_secs(30);
                }
            }
        }
        // Fail calls queued while down instead of letting them wait.
        while let Ok(call) = calls.try_recv() {
            if let Some(reply) = call.reply {
                let _ = reply.send(Err(unavailable(&address, "not connected (retrying)")));
            }
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(backoff + jitter(backoff)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(fastrand::f64() * 0.25)
}

type Reader = FrameReader<SecureRead<OwnedReadHalf>>;
type Writer = FrameWriter<SecureWrite<OwnedWriteHalf>>;

/// Opens the session: the secure handshake (our key, the swarm's, the pinned tracker key),
/// then the hello.
async fn connect(
    address: &str,
    id: &Identity,
) -> Result<(Reader, Writer, Duration, SocketAddr, bool), WireError> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(address))
        .await
        .map_err(|_| unavailable(address, "connect timed out"))?
        .map_err(|e| unavailable(address, e))?;
    let _ = stream.set_nodelay(true);
    let handshake = secure::connect(
        &mut stream,
        &id.key,
        id.swarm.as_ref(),
        id.tracker_key.as_ref(),
    );
    let session = tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .map_err(|_| unavailable(address, "no answer to the handshake in time"))?
        .map_err(|e| refused(address, e))?;
    let (r, w) = stream.into_split();
    let (r, w) = session.into_stream(r, w);
    let mut reader = FrameReader::new(r, MAX_FRAME);
    let mut writer = FrameWriter::new(w);
    let hello = TrackerRequest::Hello {
        version: PROTOCOL_VERSION,
        listen: id.listen,
        agent: p2p_schema::agent("p2pd"),
    };
    writer
        .send(&hello)
        .await
        .map_err(|e| unavailable(address, e))?;
    let welcome = tokio::time::timeout(Duration::from_secs(10), reader.expect::<TrackerResponse>())
        .await
        .map_err(|_| unavailable(address, "no welcome in time"))?
        .map_err(|e| unavailable(address, e))?;
    match welcome {
        TrackerResponse::Welcome {
            addr,
            heartbeat_ms,
            list_pages,
            ..
        } => Ok((
            reader,
            writer,
            Duration::from_millis(heartbeat_ms.clamp(50, 60_000)),
            addr,
            list_pages,
        )),
        TrackerResponse::Error(e) => {
            Err(WireError::new(e.code, format!("tracker refused us: {e}")))
        }
        other => Err(unavailable(address, format!("unexpected answer {other:?}"))),
    }
}

/// A handshake that failed, as the daemon reports it: a refusal (wrong secret, wrong key,
/// another version) is said as such, a lost connection as the tracker being unavailable.
fn refused(address: &str, e: HandshakeError) -> WireError {
    match e {
        HandshakeError::Refused(r) => {
            WireError::new(ErrorCode::Unauthorized, format!("tracker refused us: {r}"))
        }
        HandshakeError::KeyMismatch { .. } => WireError::new(
            ErrorCode::Unauthorized,
            format!("tracker {address} is not the pinned one: {e}"),
        ),
        HandshakeError::EarlierVersion { .. } => WireError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "tracker {address} speaks an earlier version of the protocol (without secure \
                 sessions): upgrade it"
            ),
        ),
        other => unavailable(address, other),
    }
}

enum SessionEnd {
    Stopped,
    Lost(String),
}

/// Answers awaited from the tracker, in request order: a reply channel, or `None` for a
/// notification (whose answer is only logged if it is an error).
type Pending = Arc<Mutex<VecDeque<Option<Reply>>>>;

/// Reads the tracker's answers and hands each to its waiter, until the connection fails;
/// returns why.
async fn read_answers(mut reader: Reader, pending: Pending, address: String) -> String {
    loop {
        let response = match reader.recv::<TrackerResponse>().await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => return "the tracker closed the connection".to_string(),
            // The whole frame was read, so the stream is still in step: this answer is
            // an error for its caller, and the session goes on.
            Err(e @ (FrameError::Decode(_) | FrameError::Trailing(_))) => {
                warn!(tracker = %address, error = %e, "the tracker sent a malformed answer");
                Err(WireError::new(
                    ErrorCode::Internal,
                    format!("the tracker {address} sent a malformed answer: {e}"),
                ))
            }
            Err(e) => return e.to_string(),
        };
        let waiter = lock(&pending).pop_front();
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                match waiter {
                    Some(Some(reply)) => {
                        let _ = reply.send(Err(e));
                    }
                    Some(None) => {}
                    None => return "the tracker sent an unsolicited message".to_string(),
                }
                continue;
            }
        };
        match waiter {
            Some(Some(reply)) => {
                let _ = reply.send(Ok(response));
            }
            Some(None) => {
                if let TrackerResponse::Error(e) = response {
                    debug!(error = %e, "tracker refused a notification");
                }
            }
            None => return "the tracker sent an unsolicited message".to_string(),
        }
    }
}

/// Sends what we hold (after a reconnect the tracker may have forgotten us) and waits until
/// the tracker has taken it in. Returns how many announcements went out.
async fn reannounce(
    writer: &mut Writer,
    announce: &Announce,
    push: &impl Fn(Option<Reply>),
    reader_task: &mut tokio::task::JoinHandle<String>,
) -> Result<usize, SessionEnd> {
    let announcements = announce();
    let (done_tx, done_rx) = oneshot::channel();
    let mut done_tx = Some(done_tx);
    let count = announcements.len();
    for (i, request) in announcements.into_iter().enumerate() {
        push(if i + 1 == count { done_tx.take() } else { None });
        writer
            .feed(&request)
            .await
            .map_err(|e| SessionEnd::Lost(e.to_string()))?;
    }
    writer
        .flush()
        .await
        .map_err(|e| SessionEnd::Lost(e.to_string()))?;
    if count > 0 {
        tokio::select! {
            _ = done_rx => {}
            why = reader_task => {
                return Err(SessionEnd::Lost(why.unwrap_or_else(|e| e.to_string())));
            }
            () = tokio::time::sleep(CALL_TIMEOUT) => {
                return Err(SessionEnd::Lost("the tracker did not take our announcements in time".into()));
            }
        }
    }
    Ok(count)
}

#[allow(clippy::too_many_arguments)]
async fn run_session(
    (address, advertised): (&str, SocketAddr),
    reader: Reader,
    mut writer: Writer,
    heartbeat: Duration,
    announce: &Announce,
    calls: &mut mpsc::Receiver<Call>,
    connected: &watch::Sender<bool>,
    stop: &CancellationToken,
) -> SessionEnd {
    let pending: Pending = Arc::default();
    let push = |reply: Option<Reply>| lock(&pending).push_back(reply);

    // Responses are read by their own task: a frame read must never be cancelled half-way.
    let mut reader_task = tokio::spawn(read_answers(reader, pending.clone(), address.to_string()));

    // Re-announce before anything else (the tracker may have forgotten us), and wait until
    // it has taken it in: only then are we "connected" for others to find.
    let count = match reannounce(&mut writer, announce, &push, &mut reader_task).await {
        Ok(count) => count,
        Err(end) => {
            reader_task.abort();
            return end;
        }
    };
    info!(tracker = %address, advertised = %advertised, announced = count, "connected to the tracker");
    let _ = connected.send(true);

    let mut tick = tokio::time::interval(heartbeat);
    tick.reset();
    let end = loop {
        tokio::select! {
            () = stop.cancelled() => {
                // Leave the network: the tracker drops our holdings at once.
                let (tx, rx) = oneshot::channel();
                push(Some(tx));
                if writer.send(&TrackerRequest::Bye).await.is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
                }
                break SessionEnd::Stopped;
            }
            why = &mut reader_task => {
                break SessionEnd::Lost(why.unwrap_or_else(|e| e.to_string()));
            }
            call = calls.recv() => {
                let Some(call) = call else { break SessionEnd::Stopped };
                push(call.reply);
                if let Err(e) = writer.send(&call.request).await {
                    break SessionEnd::Lost(e.to_string());
                }
            }
            _ = tick.tick() => {
                push(None);
                if let Err(e) = writer.send(&TrackerRequest::Heartbeat).await {
                    break SessionEnd::Lost(e.to_string());
                }
            }
        }
    };
    reader_task.abort();
    // Waiters of a lost session get an error (their senders drop here).
    lock(&pending).clear();
    end
}
