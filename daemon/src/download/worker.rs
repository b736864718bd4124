//! A worker: fetches chunks from one peer, verifies and writes them.

use super::*;
use crate::metrics::Direction;

mod haves;

pub(super) fn start_worker(swarm: &Arc<Swarm>, holder: Holder) {
    if holder.peer_id == swarm.node.peer_id {
        return;
    }
    if !lock(&swarm.peers).may_try(&holder.peer_id) {
        return;
    }
    let n = swarm.dl.manifest.chunk_count();
    // A brief answer says only whether the holder has everything; the rest the peer says
    // itself once connected (its answer to `Watch`, or to `GetHave`).
    let known = holder.complete || holder.chunks.len() == n;
    let chunks = if holder.complete {
        Bitfield::full(n)
    } else if holder.chunks.len() == n {
        holder.chunks.clone()
    } else if holder.chunks.is_empty() {
        Bitfield::new(n)
    } else {
        return;
    };
    {
        let mut workers = lock(&swarm.workers);
        if workers.contains(&holder.peer_id) {
            if known {
                lock(&swarm.fresh).insert(holder.peer_id, chunks);
            }
            return;
        }
        if workers.len() >= MAX_WORKERS {
            return;
        }
        workers.insert(holder.peer_id);
    }
    let tasks = swarm.tasks.clone();
    let swarm = swarm.clone();
    let span = tracing::debug_span!("peer", addr = %holder.addr);
    tasks.spawn(
        async move {
            let peer = holder.peer_id;
            let mut worker = Worker::new(swarm.clone(), holder.addr, peer);
            // Cut short wherever it waits once the download ends (or is stopped: `finished`
            // is a child of its stop token): only the chunk writes it started must be waited
            // for, and `drain` does that.
            let result = tokio::select! {
                r = worker.run(chunks) => r,
                () = swarm.finished.cancelled() => Ok(()),
            };
            // Chunks still being verified are taken in before the worker lets go of them.
            let drained = worker.drain().await;
            let result = result.and(drained);
            let delivered = worker.delivered;
            drop(worker);
            session_ended(&swarm, peer, holder.addr, delivered, result);
            lock(&swarm.workers).remove(&peer);
            lock(&swarm.fresh).remove(&peer);
            swarm.progress.notify_one();
        }
        .instrument(span),
    );
}

/// Decides what becomes of `peer` after a session, logs it, and keeps a write error for
/// the coordinator.
fn session_ended(
    swarm: &Swarm,
    peer: PeerId,
    addr: SocketAddr,
    delivered: u32,
    result: Result<(), WorkerError>,
) {
    let verdict = lock(&swarm.peers).session_ended(peer, delivered, result.as_ref().err());
    match (&result, verdict) {
        (Err(WorkerError::Write(e)), _) => {
            lock(&swarm.write_error).get_or_insert_with(|| e.clone());
        }
        (Err(e), Verdict::SetAside) => {
            warn!(peer = %addr, "peer set aside from this download for {SET_ASIDE:?}: {e} ({MAX_FAULTS} faults in a row)");
        }
        (Err(e), Verdict::Banned) => {
            warn!(peer = %addr, "peer banned from this download: {e}");
        }
        (Err(e), Verdict::Retry(wait)) => {
            info!("stopped fetching from this peer: {e}; trying it again in {wait:?}");
        }
        (Ok(()), _) => {}
    }
}

/// Fetches chunks from one peer.
struct Worker {
    swarm: Arc<Swarm>,
    addr: SocketAddr,
    peer: PeerId,
    /// What the peer holds, as counted in the picker's availability.
    has: Bitfield,
    /// Chunks requested and not yet answered, oldest first.
    asked: VecDeque<u32>,
    /// Chunks received and being verified and written, oldest first.
    verifying: VecDeque<(u32, Verifying)>,
    /// Spare chunk buffers.
    pool: Vec<AlignedBuf>,
    /// Bytes received from this peer since `since`: its rate sizes the request window.
    received: u64,
    since: Instant,
    /// Verified chunks this session delivered.
    delivered: u32,
    /// Refusals since the last chunk delivered (see [`MAX_REFUSALS`]).
    refusals: u32,
    /// The peer pushes what it gains (it answered our `Watch`); else it is polled.
    pushes: bool,
    /// Since when nothing this peer has was needed (`None` while it had something).
    idle_since: Option<Instant>,
    /// Chunks the peer answered `Busy` for, oldest first, with when each counts as held
    /// there again ([`BUSY_RETRY`]).
    refused: VecDeque<(Instant, u32)>,
}

/// A chunk being verified and written: its index, buffer, and whether it matched.
type Verifying = tokio::task::JoinHandle<(u32, AlignedBuf, std::io::Result<bool>)>;

/// Bytes a download may have in verification and writing at once, across its workers (each
/// worker may have at least [`MIN_VERIFYING`] chunks): a lone peer's stream keeps going while
/// several chunks wait on the disk.
const VERIFYING_PER_DOWNLOAD: usize = 8 << 20;
const MIN_VERIFYING: usize = 2;

impl Drop for Worker {
    fn drop(&mut self) {
        let mut picker = self.swarm.picker();
        for &i in &self.asked {
            picker.release(i);
        }
        picker.add_availability(&self.has, -1);
        drop(picker);
        if !self.asked.is_empty() {
            self.swarm.changed.notify_waiters();
        }
    }
}

impl Worker {
    fn new(swarm: Arc<Swarm>, addr: SocketAddr, peer: PeerId) -> Worker {
        Worker {
            swarm,
            addr,
            peer,
            has: Bitfield::new(0),
            asked: VecDeque::new(),
            verifying: VecDeque::new(),
            pool: Vec::new(),
            received: 0,
            since: Instant::now(),
            delivered: 0,
            refusals: 0,
            pushes: false,
            idle_since: None,
            refused: VecDeque::new(),
        }
    }

    fn set_has(&mut self, has: Bitfield) {
        let mut picker = self.swarm.picker();
        picker.add_availability(&self.has, -1);
        picker.add_availability(&has, 1);
        self.has = has;
    }

    /// Fetches from the peer until nothing it has is needed, or an error. The caller cuts it
    /// short when the download ends (every await here is cancellation safe: chunk writes
    /// already started stay queued for [`Worker::drain`]).
    async fn run(&mut self, chunks: Bitfield) -> Result<(), WorkerError> {
        let timeout = self.swarm.node.config.request_timeout;
        let (mut reader, mut writer, read, pushes) = self.connect(timeout).await?;
        let _counted = self.swarm.node.metrics.connection(Direction::Out);
        self.set_has(chunks);
        if pushes {
            let watch = PeerRequest::Watch {
                file_id: self.swarm.dl.id,
            };
            self.ask_have(&mut reader, &mut writer, watch, timeout)
                .await?;
            self.pushes = true;
        }
        debug!(pushes, "connected");
        let mut buf = AlignedBuf::new();
        loop {
            self.take_fresh();
            self.take_back_refused();
            self.fill_window(&mut writer).await?;
            if self.asked.is_empty() && !self.verifying.is_empty() {
                // Nothing on the wire: take in what is being verified before deciding more.
                self.drain().await?;
                continue;
            }
            if self.asked.is_empty() {
                if self.swarm.picker().remaining == 0 {
                    return Ok(());
                }
                if !self.idle(&mut reader, &mut writer, timeout).await? {
                    debug!("nothing needed from this peer for a while: its slot goes to another");
                    return Ok(());
                }
                continue;
            }
            // A chunk verified and written is taken in (committed, served, announced) as soon
            // as it is, not when the next answer happens to arrive: that may be long, or a
            // refusal, and the swarm waits for the chunk meanwhile.
            if !self.verifying.is_empty() && !self.answer_or_verified(&mut reader).await? {
                continue;
            }
            let hash_inline = self.hash_inline();
            // Timed out on lack of progress, not on the whole chunk: a slow peer that keeps
            // sending is waited for, a silent or dripping one is not.
            let manifest = &self.swarm.dl.manifest;
            let received = tokio::select! {
                () = stalled(&read, timeout) => Err(WorkerError::Misbehaved(format!(
                    "less than {} KiB in {timeout:?}",
                    MIN_PROGRESS >> 10
                ))),
                r = receive(&mut reader, manifest, &mut self.asked, &mut buf, hash_inline) => r,
            };
            self.take_answer(received?, &mut buf).await?;
        }
    }

    /// Waits until the peer's next answer begins to arrive (true), or the oldest chunk being
    /// verified is taken in (false), whichever comes first.
    async fn answer_or_verified(&mut self, reader: &mut PeerReader) -> Result<bool, WorkerError> {
        tokio::select! {
            biased;
            done = self.finish_one() => done.map(|()| false),
            ready = reader.ready() => match ready {
                Ok(true) => Ok(true),
                Ok(false) => Err(WorkerError::Unreachable("the peer closed the connection".into())),
                Err(e) => Err(net(e)),
            },
        }
    }

    /// Connects to the peer and says hello; the peer must answer as the peer it was listed as.
    /// Also returns whether the peer pushes what it gains.
    async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<(PeerReader, PeerWriter, Arc<AtomicU64>, bool), WorkerError> {
        use WorkerError::{Misbehaved, Unreachable};
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(self.addr))
            .await
            .map_err(|_| Unreachable("connect timed out".into()))?
            .map_err(|e| Unreachable(format!("connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let opened = crate::link::open(stream, &self.swarm.node.links, self.peer);
        let (r, w) = tokio::time::timeout(timeout, opened)
            .await
            .map_err(|_| Misbehaved("no handshake in time".into()))?
            .map_err(|e| match e {
                crate::link::LinkError::Io(e) => Unreachable(format!("handshake: {e}")),
                other => Misbehaved(other.to_string()),
            })?;
        let read = Arc::new(AtomicU64::new(0));
        let counted = Counted {
            inner: r,
            read: read.clone(),
        };
        let mut reader: PeerReader = FrameReader::new(counted, MAX_PEER_FRAME);
        let mut writer: PeerWriter = FrameWriter::new(w);
        writer
            .send(&PeerRequest::Hello {
                version: PROTOCOL_VERSION,
                peer_id: self.swarm.node.peer_id,
                agent: p2p_schema::agent("p2pd"),
            })
            .await
            .map_err(net)?;
        match tokio::time::timeout(timeout, reader.expect::<PeerResponse>()).await {
            Ok(Ok(PeerResponse::Welcome {
                peer_id, pushes, ..
            })) if peer_id == self.peer => Ok((reader, writer, read, pushes)),
            Ok(Ok(PeerResponse::Welcome { .. })) => {
                Err(Misbehaved("a different peer answered".into()))
            }
            Ok(Ok(other)) => Err(Misbehaved(format!("unexpected hello answer {other:?}"))),
            Ok(Err(e)) => Err(net(e)),
            Err(_) => Err(Misbehaved("no welcome in time".into())),
        }
    }

    /// Asks for chunks until the request window is full.
    async fn fill_window(&mut self, writer: &mut PeerWriter) -> Result<(), WorkerError> {
        let file_id = self.swarm.dl.id;
        let mut fed = false;
        let window = self.window();
        while self.asked.len() < window {
            let mine = |i| self.asked.contains(&i) || self.verifying.iter().any(|v| v.0 == i);
            let Some(i) = self.swarm.picker().pick(&self.has, mine) else {
                break;
            };
            self.asked.push_back(i);
            self.idle_since = None;
            writer
                .feed(&PeerRequest::GetChunk { file_id, index: i })
                .await
                .map_err(net)?;
            fed = true;
        }
        if fed {
            writer.flush().await.map_err(net)?;
        }
        Ok(())
    }

    /// Takes in an answer: a refusal (counted; refusal after refusal is a fault), or a chunk
    /// in `buf`, handed to a blocking thread to verify and write while the next one arrives.
    async fn take_answer(
        &mut self,
        received: Received,
        buf: &mut AlignedBuf,
    ) -> Result<(), WorkerError> {
        match received {
            Received::Gained(file_id, indices) => self.gain(file_id, &indices)?,
            Received::Refused(index, e) => {
                debug!(index, "peer refused a chunk: {e}");
                self.swarm.picker().release(index);
                let mut has = self.has.clone();
                has.unset(index);
                self.set_has(has);
                self.swarm.changed.notify_waiters();
                if e.code == ErrorCode::Busy {
                    self.refused.push_back((Instant::now() + BUSY_RETRY, index));
                } else {
                    self.refusals += 1;
                }
                if self.refusals >= MAX_REFUSALS {
                    return Err(WorkerError::Misbehaved(format!(
                        "it refused chunk after chunk it announced (last: {e})"
                    )));
                }
            }
            Received::Chunk(index, matched) => {
                self.received += buf.len() as u64;
                let data = std::mem::replace(buf, self.pool.pop().unwrap_or_default());
                let write = self.start_write(index, data, matched)?;
                self.verifying.push_back((index, write));
                let most = self.max_verifying();
                while self
                    .verifying
                    .front()
                    .is_some_and(|(_, h)| h.is_finished() || self.verifying.len() > most)
                {
                    self.finish_one().await?;
                }
            }
        }
        Ok(())
    }

    /// Requests to keep in flight: enough for about [`WINDOW_LATENCY`] of this peer's rate,
    /// at least 1 and at most the download's window; 2 until the rate is known. A slow or busy
    /// peer gets one request at a time: in a crowd every peer is asked by many, and the
    /// deeper each asker's queue there, the longer a chunk waits at each hop through the
    /// swarm (a fast peer's queue still covers its rate).
    fn window(&self) -> usize {
        let elapsed = self.since.elapsed().as_secs_f64();
        if self.received == 0 || elapsed < 0.05 {
            return self.swarm.window.min(2);
        }
        let rate = self.received as f64 / elapsed;
        let chunk = f64::from(self.swarm.dl.manifest.chunk_size.max(1));
        let wanted = (rate * WINDOW_LATENCY.as_secs_f64() / chunk).ceil() as usize;
        wanted.clamp(1, self.swarm.window.max(1))
    }

    /// Waits for every chunk still being verified and takes in the outcomes: all of them,
    /// even after one fails, so that no write of this worker is still running when it ends.
    /// Returns the first failure.
    async fn drain(&mut self) -> Result<(), WorkerError> {
        let mut result = Ok(());
        while !self.verifying.is_empty() {
            let one = self.finish_one().await;
            result = result.and(one);
        }
        result
    }

    /// Waits for the oldest chunk being verified and takes in the outcome. Cancellation
    /// safe: the write stays queued (and is waited for by [`Worker::drain`]) until it has
    /// returned.
    async fn finish_one(&mut self) -> Result<(), WorkerError> {
        let Some((_, handle)) = self.verifying.front_mut() else {
            return Ok(());
        };
        let joined = handle.await;
        self.verifying.pop_front();
        let (index, data, outcome) = joined.map_err(|e| WorkerError::Internal(e.to_string()))?;
        let data = self.accept(index, data, outcome)?;
        if self.pool.len() <= self.max_verifying() {
            self.pool.push(data);
        }
        Ok(())
    }

    /// Chunks this worker may have in verification and writing at once.
    fn max_verifying(&self) -> usize {
        let workers = lock(&self.swarm.workers).len().max(1);
        let chunk = self.swarm.dl.manifest.chunk_size.max(1) as usize;
        (VERIFYING_PER_DOWNLOAD / chunk / workers).max(MIN_VERIFYING)
    }

    /// Whether to hash chunks from this peer as they arrive, on this task. With other peers
    /// sending too, that saves a hand-off to another thread per chunk and a second pass over
    /// the data; from a lone peer it would leave the receiving and the hashing of the only
    /// stream on one core, so its chunks are hashed on blocking threads instead.
    fn hash_inline(&self) -> bool {
        lock(&self.swarm.workers).len() > 1
    }

    /// Starts checking chunk `index` (in `data`) against its hash, unless that was done as it
    /// arrived (`matched`), and writing it in place if it matches, on a blocking thread.
    fn start_write(
        &self,
        index: u32,
        data: AlignedBuf,
        matched: Option<bool>,
    ) -> Result<Verifying, WorkerError> {
        let dl = &self.swarm.dl;
        let out_of_range = || WorkerError::Internal(format!("chunk {index} is out of range"));
        let (offset, len) = dl.manifest.chunk_range(index).ok_or_else(out_of_range)?;
        let expected = *dl.manifest.hash(index).ok_or_else(out_of_range)?;
        let file = dl.local.handle();
        let aligned = offset.is_multiple_of(ALIGN as u64) && (len as usize).is_multiple_of(ALIGN);
        let direct = lock(&dl.direct).clone().filter(|_| aligned);
        let swarm = self.swarm.clone();
        Ok(tokio::task::spawn_blocking(move || {
            if !matched.unwrap_or_else(|| sha256(&data) == expected) {
                return (index, data, Ok(false));
            }
            if swarm.picker().done.get(index) {
                // An end-game duplicate of a chunk already in: not written again.
                return (index, data, Ok(true));
            }
            let written = match direct.map(|d| write_all_at(&d, &data, offset)) {
                Some(Ok(())) => Ok(()),
                // Buffered where direct I/O is not possible (or was refused).
                Some(Err(_)) | None => file.and_then(|file| {
                    write_all_at(&file, &data, offset)
                        .inspect(|()| start_writeback(&file, offset, data.len()))
                }),
            };
            (index, data, written.map(|()| true))
        }))
    }

    /// Takes in the outcome of verifying chunk `index`: counts it, commits it, or discards
    /// it and strikes the peer. Returns the buffer for reuse.
    fn accept(
        &mut self,
        index: u32,
        data: AlignedBuf,
        outcome: std::io::Result<bool>,
    ) -> Result<AlignedBuf, WorkerError> {
        let swarm = &self.swarm;
        let dl = &swarm.dl;
        let len = data.len() as u64;
        match outcome {
            Ok(true) => {
                let (new, have) = {
                    let mut picker = swarm.picker();
                    let new = picker.finish(index);
                    (new, picker.done.len() - picker.remaining)
                };
                self.delivered += 1;
                self.refusals = 0;
                if new {
                    dl.record_chunk(self.addr, len);
                    swarm.node.metrics.verified(&dl.id, len);
                    let _ = swarm.commits.send(index);
                    let _ = dl.events.send(Event::Chunk {
                        index,
                        from: self.addr,
                        have,
                    });
                } else {
                    dl.wasted.fetch_add(len, Ordering::Relaxed);
                }
                Ok(data)
            }
            Ok(false) => {
                dl.wasted.fetch_add(len, Ordering::Relaxed);
                swarm.node.metrics.rejected();
                swarm.picker().release(index);
                swarm.changed.notify_waiters();
                let strikes = lock(&swarm.peers).strike(self.peer);
                warn!(index, strikes, "chunk failed verification; discarded");
                if strikes >= MAX_STRIKES {
                    return Err(WorkerError::BadData(strikes));
                }
                Ok(data)
            }
            Err(e) => {
                swarm.picker().release(index);
                Err(WorkerError::Write(WriteError::new(dl, index, &e)))
            }
        }
    }
}
