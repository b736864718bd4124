//! A collection's pack as spans of the files it packs: served by reading them where they lie,
//! so that neither the daemon that registered a tree nor one that downloaded it keeps a
//! second copy of its small files.

use p2p_schema::FileId;

/// Where each packed file lies in the pack, in pack order; the spans follow one another with
/// no gap, from 0 to the pack's size.
#[derive(Debug)]
pub struct Spans {
    spans: Vec<Span>,
}

#[derive(Debug)]
struct Span {
    /// Offset in the pack.
    start: u64,
    len: u64,
    /// The packed file's content.
    member: FileId,
}

/// One piece of a read: which file, from where in it, into which bytes of the buffer.
pub struct Piece {
    pub member: FileId,
    pub offset: u64,
    pub into: std::ops::Range<usize>,
}

impl Spans {
    /// The spans of files (content, size) laid one after the other.
    pub fn new(files: impl IntoIterator<Item = (FileId, u64)>) -> Spans {
        let mut start = 0;
        let spans = files
            .into_iter()
            .map(|(member, len)| {
                let span = Span { start, len, member };
                start += len;
                span
            })
            .collect();
        Spans { spans }
    }

    /// The pack's size.
    pub fn size(&self) -> u64 {
        self.spans.last().map_or(0, |s| s.start + s.len)
    }

    /// The pieces that make up `len` bytes of the pack at `offset`; `None` if they go past
    /// its end.
    pub fn pieces(&self, offset: u64, len: usize) -> Option<Vec<Piece>> {
        let end = offset.checked_add(len as u64)?;
        if end > self.size() {
            return None;
        }
        let first = self.spans.partition_point(|s| s.start + s.len <= offset);
        let mut out = Vec::new();
        for s in self.spans[first..].iter().take_while(|s| s.start < end) {
            let from = offset.max(s.start);
            let to = end.min(s.start + s.len);
            if from < to {
                let into = (from - offset) as usize..(to - offset) as usize;
                out.push(Piece {
                    member: s.member,
                    offset: from - s.start,
                    into,
                });
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_a_read_exactly_across_files() {
        let ids: Vec<FileId> = (1..=4u8).map(|k| FileId([k; 32])).collect();
        let spans = Spans::new(ids.iter().copied().zip([10, 5, 1, 20]));
        assert_eq!(spans.size(), 36);
        let got = |offset, len| {
            spans.pieces(offset, len).map(|ps| {
                ps.into_iter()
                    .map(|p| (p.member.0[0], p.offset, p.into))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(got(0, 10), Some(vec![(1, 0, 0..10)]));
        assert_eq!(
            got(8, 10),
            Some(vec![
                (1, 8, 0..2),
                (2, 0, 2..7),
                (3, 0, 7..8),
                (4, 0, 8..10)
            ])
        );
        assert_eq!(got(15, 21), Some(vec![(3, 0, 0..1), (4, 0, 1..21)]));
        assert_eq!(got(35, 1), Some(vec![(4, 19, 0..1)]));
        assert_eq!(got(30, 7), None, "past the end");
        assert_eq!(got(u64::MAX, 2), None);
        assert_eq!(got(36, 0), Some(vec![]));
    }
}
