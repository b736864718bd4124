//! What a worker learns of its peer's chunks: pushes (`Watch`, then `Gained`), asking
//! (`GetHave`), the tracker's word, and waiting while the peer has nothing we need.

use super::*;

impl Worker {
    /// Nothing this peer has is needed now: waits for a change here (a chunk released) or
    /// there. A peer that pushes says what it gains (and is asked what it holds now and then,
    /// which also keeps the connection from idling out); one that does not is asked every
    /// [`HAVE_POLL_INTERVAL`] (it may be downloading too).
    ///
    /// Returns false when the worker should end and give its slot up: every slot is taken and
    /// this peer has had nothing we need for [`ROTATE_IDLE`]. Peers that joined later (and
    /// hold chunks nobody else has yet) then get a slot.
    pub(super) async fn idle(
        &mut self,
        reader: &mut PeerReader,
        writer: &mut PeerWriter,
        timeout: Duration,
    ) -> Result<bool, WorkerError> {
        let file_id = self.swarm.dl.id;
        let rotate_at = *self.idle_since.get_or_insert_with(Instant::now) + ROTATE_IDLE;
        let full = lock(&self.swarm.workers).len() >= MAX_WORKERS;
        if full && Instant::now() >= rotate_at {
            return Ok(false);
        }
        // A chunk refused as busy counts as held again then.
        let retry = self.refused.front().map(|&(at, _)| at);
        let retry = async move {
            match retry {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending::<()>().await,
            }
        };
        let rotate = async {
            if full {
                tokio::time::sleep_until(rotate_at.into()).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        if !self.pushes {
            tokio::select! {
                () = self.swarm.changed.notified() => {}
                () = tokio::time::sleep(HAVE_POLL_INTERVAL) => {}
                () = rotate => return Ok(true),
                () = retry => return Ok(true),
            }
            return self
                .ask_have(reader, writer, PeerRequest::GetHave { file_id }, timeout)
                .await
                .map(|()| true);
        }
        let woke = tokio::select! {
            () = self.swarm.changed.notified() => Ok(()),
            () = rotate => Ok(()),
            () = retry => Ok(()),
            () = tokio::time::sleep(HAVE_RESYNC_INTERVAL) => {
                self.ask_have(reader, writer, PeerRequest::GetHave { file_id }, timeout).await
            }
            ready = reader.ready() => match ready {
                Ok(true) => self.take_push(reader, timeout).await,
                Ok(false) => Err(WorkerError::Unreachable("the peer closed the connection".into())),
                Err(e) => Err(net(e)),
            },
        };
        woke.map(|()| true)
    }

    /// Reads a frame the peer sent unasked: only a push of what it gained may come.
    async fn take_push(
        &mut self,
        reader: &mut PeerReader,
        timeout: Duration,
    ) -> Result<(), WorkerError> {
        use WorkerError::Misbehaved;
        match tokio::time::timeout(timeout, reader.expect::<PeerResponse>()).await {
            Ok(Ok(PeerResponse::Gained { file_id, indices })) => self.gain(file_id, &indices),
            Ok(Ok(other)) => Err(Misbehaved(format!("unexpected message {other:?}"))),
            Ok(Err(e)) => Err(net(e)),
            Err(_) => Err(Misbehaved("a message cut short".into())),
        }
    }

    /// Takes in chunks the peer says it gained (pushed).
    pub(super) fn gain(&mut self, file_id: FileId, indices: &[u32]) -> Result<(), WorkerError> {
        let n = self.swarm.dl.manifest.chunk_count();
        if file_id != self.swarm.dl.id || indices.iter().any(|&i| i >= n) {
            return Err(WorkerError::Misbehaved("a malformed push".into()));
        }
        let mut picker = self.swarm.picker();
        for &i in indices {
            if self.has.set(i) {
                picker.add_availability_of(i, 1);
            }
        }
        self.swarm.node.metrics.pushed(Direction::Out);
        Ok(())
    }

    /// Counts again as held the chunks the peer refused as `Busy` long enough ago.
    pub(super) fn take_back_refused(&mut self) {
        let now = Instant::now();
        let mut picker = None;
        while let Some(&(at, i)) = self.refused.front() {
            if at > now {
                break;
            }
            self.refused.pop_front();
            if self.has.set(i) {
                picker
                    .get_or_insert_with(|| self.swarm.picker())
                    .add_availability_of(i, 1);
            }
        }
    }

    /// Takes in what the tracker last said the peer holds: chunks only ever arrive at a peer.
    pub(super) fn take_fresh(&mut self) {
        let fresh = lock(&self.swarm.fresh).remove(&self.peer);
        if let Some(fresh) = fresh {
            let mut has = self.has.clone();
            for i in fresh.iter() {
                has.set(i);
            }
            self.set_has(has);
        }
    }

    /// Asks the peer what it holds now (`GetHave`, or `Watch` to be told from then on too),
    /// taking in pushes that come before the answer.
    pub(super) async fn ask_have(
        &mut self,
        reader: &mut PeerReader,
        writer: &mut PeerWriter,
        ask: PeerRequest,
        timeout: Duration,
    ) -> Result<(), WorkerError> {
        use WorkerError::Misbehaved;
        writer.send(&ask).await.map_err(net)?;
        let answered = tokio::time::timeout(timeout, async {
            loop {
                match reader.expect::<PeerResponse>().await.map_err(net)? {
                    PeerResponse::Gained { file_id, indices } => self.gain(file_id, &indices)?,
                    other => return Ok(other),
                }
            }
        });
        match answered.await {
            Ok(Ok(PeerResponse::Have { chunks })) => {
                let n = self.swarm.dl.manifest.chunk_count();
                let chunks = chunks
                    .checked(n)
                    .ok_or_else(|| Misbehaved("malformed have".into()))?;
                self.set_has(chunks);
                Ok(())
            }
            // A holder of the collection this file is part of may not have begun this file
            // yet: not a fault, asked again later.
            Ok(Ok(PeerResponse::Error(e))) if e.code == p2p_schema::ErrorCode::NotFound => {
                Err(WorkerError::Unreachable(format!("peer: {e}")))
            }
            Ok(Ok(PeerResponse::Error(e))) => Err(Misbehaved(format!("peer: {e}"))),
            Ok(Ok(other)) => Err(Misbehaved(format!("unexpected answer {other:?}"))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Misbehaved("no answer in time".into())),
        }
    }
}
