//! Serving a collection's pack, read from the files it packs (see [`crate::spans`]).

use std::sync::Arc;

use p2p_schema::{FileId, PeerId, PeerResponse};
use tracing::warn;

use super::chunk::{refuse, send_buf, sent, SendBuf};
use super::{Uploads, Writer};
use crate::local::LocalFile;
use crate::node::Node;
use crate::spans::{Piece, Spans};

/// Sends chunk `index` (`len` bytes at `offset`) of the pack `local`, read from its files
/// before anything is sent. A file of the pack gone or changed: the pack is no longer whole
/// here, and stops being served.
pub(super) async fn send_packed(
    node: &Node,
    uploads: &Uploads,
    writer: &mut Writer,
    (local, spans): (&Arc<LocalFile>, &Spans),
    (file_id, index, offset, len): (&FileId, u32, u64, u32),
    buf: &mut SendBuf,
    peer: PeerId,
) -> Result<(), String> {
    match read_packed(node, uploads, spans, offset, len, std::mem::take(buf)).await {
        Ok(read) => *buf = read,
        Err(e) => {
            let why = format!("a file it packs cannot be served: {e}");
            warn!(file = %file_id.short(), "{why}; no longer serving the pack");
            local.set_problem(why);
            return refuse(writer, format!("chunk {index} cannot be read: {e}")).await;
        }
    }
    send_buf(uploads, writer, &PeerResponse::Chunk { index, len }, buf).await?;
    sent(node, local, (file_id, index, len), peer);
    Ok(())
}

/// Reads `len` bytes of a pack at `offset` from the files it packs, each checked to be the
/// file recorded (a `stat`) first: one not held whole, changed, or unreadable fails the read.
async fn read_packed(
    node: &Node,
    uploads: &Uploads,
    spans: &Spans,
    offset: u64,
    len: u32,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let pieces = spans
        .pieces(offset, len as usize)
        .ok_or("a chunk past the pack's end")?;
    let pieces: Vec<(Piece, Arc<LocalFile>)> = pieces
        .into_iter()
        .map(|p| {
            let local = node.local_file(&p.member).filter(|l| l.is_complete());
            local
                .map(|l| (p, l))
                .ok_or("a file of the pack is not held here")
        })
        .collect::<Result<_, _>>()?;
    let _permit = uploads.slots.acquire().await.map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || {
        buf.resize(len as usize, 0);
        for (piece, local) in &pieces {
            local.check_source()?;
            let file = local.handle().map_err(|e| e.to_string())?;
            crate::fileio::read_exact_at(&file, &mut buf[piece.into.clone()], piece.offset)
                .map_err(|e| e.to_string())?;
        }
        Ok(buf)
    })
    .await
    .map_err(|e| e.to_string())?
}
