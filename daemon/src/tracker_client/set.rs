//! Several trackers, none a single point of failure. Each file's record (its manifest and
//! who holds it) lives on `replicas` of them (default 2), chosen by rendezvous hashing of the
//! file ID over the tracker list: every daemon given the same list picks the same trackers
//! for a file, and a list that changes by one tracker moves only the files that tracker had.
//! Per-file requests go to those; `list` and `find` ask every tracker and merge what the
//! live ones say. A tracker that is down is skipped at once (its session fails calls while it
//! reconnects), and when it comes back each daemon's session re-announces what it holds of
//! that tracker's files: tracker state is soft, rebuilt from the peers, so no protocol runs
//! between trackers.

use std::collections::HashMap;

use p2p_schema::{ErrorCode, FileId, FileSummary, Holder, Manifest, TrackerRequest, WireError};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use super::TrackerClient;

/// Records kept of each file, unless configured otherwise.
pub const DEFAULT_REPLICAS: usize = 2;

/// The trackers a file's record lives on: indices into `addresses`, best first.
pub fn homes(addresses: &[String], id: &FileId, replicas: usize) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = addresses
        .iter()
        .enumerate()
        .map(|(i, address)| (weight(address, id), i))
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored
        .into_iter()
        .take(replicas.max(1))
        .map(|(_, i)| i)
        .collect()
}

/// Rendezvous (highest random weight) hashing: the weight of `tracker` for file `id`.
fn weight(tracker: &str, id: &FileId) -> u64 {
    let mut h = Sha256::new();
    h.update(b"p2p rendezvous v1\0");
    h.update(tracker.as_bytes());
    h.update([0]);
    h.update(id.0);
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The file a request is about, if it is about one.
pub fn file_of(request: &TrackerRequest) -> Option<FileId> {
    match request {
        TrackerRequest::Register { manifest, .. } => Some(manifest.file_id()),
        TrackerRequest::Have { file_id, .. }
        | TrackerRequest::Gained { file_id, .. }
        | TrackerRequest::Drop { file_id }
        | TrackerRequest::GetManifest { file_id }
        | TrackerRequest::Locate { file_id, .. } => Some(*file_id),
        _ => None,
    }
}

/// A handle on every tracker session. Cheap to clone.
#[derive(Clone)]
pub struct Trackers {
    clients: Vec<TrackerClient>,
    addresses: Vec<String>,
    replicas: usize,
}

impl Trackers {
    /// Over `clients` (one per tracker, in the configured order), keeping each file's record
    /// on `replicas` of them.
    pub fn new(clients: Vec<TrackerClient>, replicas: usize) -> Trackers {
        let addresses = clients.iter().map(|c| c.address().to_string()).collect();
        Trackers {
            clients,
            addresses,
            replicas: replicas.max(1),
        }
    }

    /// The trackers, as configured, comma-separated.
    pub fn address(&self) -> String {
        self.addresses.join(",")
    }

    /// Each tracker's session.
    pub fn clients(&self) -> &[TrackerClient] {
        &self.clients
    }

    /// Is at least one session up?
    pub fn is_connected(&self) -> bool {
        self.clients.iter().any(TrackerClient::is_connected)
    }

    /// Why sessions are down, for those whose opening keeps failing.
    pub fn problem(&self) -> Option<String> {
        let problems: Vec<String> = self
            .clients
            .iter()
            .filter_map(|c| {
                let p = c.problem()?;
                Some(if self.clients.len() > 1 {
                    format!("{}: {p}", c.address())
                } else {
                    p
                })
            })
            .collect();
        (!problems.is_empty()).then(|| problems.join("; "))
    }

    /// The sessions of the trackers holding `id`'s record, best first.
    fn homes(&self, id: &FileId) -> Vec<TrackerClient> {
        homes(&self.addresses, id, self.replicas)
            .into_iter()
            .map(|i| self.clients[i].clone())
            .collect()
    }

    /// Registers `manifest` on each of its trackers; succeeds if one of them took it.
    pub async fn register(&self, manifest: Manifest) -> Result<FileSummary, WireError> {
        let homes = self.homes(&manifest.file_id());
        let answers = each(homes, move |c| {
            let manifest = manifest.clone();
            async move { c.register(manifest).await }
        })
        .await;
        first_ok(answers)
    }

    /// The files matching `query` on any tracker.
    pub async fn find(&self, query: &str) -> Result<Vec<FileSummary>, WireError> {
        let query = query.to_string();
        let answers = each(self.clients.clone(), move |c| {
            let query = query.clone();
            async move { c.find(&query).await }
        })
        .await;
        merge_files(answers)
    }

    /// Every file on the network: what every live tracker lists, merged.
    pub async fn list(&self) -> Result<Vec<FileSummary>, WireError> {
        let answers = each(self.clients.clone(), |c| async move { c.list().await }).await;
        merge_files(answers)
    }

    /// The manifest of file `id`, from the first of its trackers that has it (check it
    /// against `id`).
    pub async fn manifest(&self, id: FileId) -> Result<Manifest, WireError> {
        let mut first_error = None;
        for c in self.homes(&id) {
            match c.manifest(id).await {
                Ok(m) => return Ok(m),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(no_tracker))
    }

    /// Up to `max` holders of file `id`, as its live trackers know them (merged: a holder
    /// known to two holds what either says). With `brief`, without what each holds (see
    /// `TrackerRequest::Locate`).
    pub async fn locate(
        &self,
        id: FileId,
        max: u32,
        brief: bool,
    ) -> Result<(FileSummary, Vec<Holder>), WireError> {
        let answers = each(self.homes(&id), move |c| async move {
            c.locate(id, max, brief).await
        })
        .await;
        let mut file: Option<FileSummary> = None;
        let mut holders: HashMap<p2p_schema::PeerId, Holder> = HashMap::new();
        let mut first_error = None;
        for answer in answers {
            match answer {
                Ok((summary, list)) => {
                    for h in list {
                        match holders.get_mut(&h.peer_id) {
                            Some(known) => {
                                known.chunks = union(&known.chunks, &h.chunks);
                                known.complete |= h.complete;
                            }
                            None => {
                                holders.insert(h.peer_id, h);
                            }
                        }
                    }
                    file = Some(match file {
                        Some(f) => larger(f, summary),
                        None => summary,
                    });
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let file = file.ok_or_else(|| first_error.unwrap_or_else(no_tracker))?;
        let mut holders: Vec<Holder> = holders.into_values().collect();
        holders.truncate(max as usize);
        Ok((file, holders))
    }

    /// Sends `request` without waiting: to the trackers of its file, or to every tracker.
    pub fn notify(&self, request: TrackerRequest) {
        let targets = match file_of(&request) {
            Some(id) => self.homes(&id),
            None => self.clients.clone(),
        };
        for c in targets {
            c.notify(request.clone());
        }
    }
}

/// Runs `call` on every client at once; the answers, in no particular order.
async fn each<T, F, Fut>(clients: Vec<TrackerClient>, call: F) -> Vec<Result<T, WireError>>
where
    T: Send + 'static,
    F: Fn(TrackerClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, WireError>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for c in clients {
        set.spawn(call(c));
    }
    let mut answers = Vec::new();
    while let Some(joined) = set.join_next().await {
        answers.push(joined.unwrap_or_else(|e| {
            Err(WireError::new(
                ErrorCode::Internal,
                format!("a tracker call failed: {e}"),
            ))
        }));
    }
    answers
}

fn no_tracker() -> WireError {
    WireError::new(ErrorCode::TrackerUnavailable, "no tracker is configured")
}

/// The first success, else the first error (a "not found" before "unavailable").
fn first_ok<T>(answers: Vec<Result<T, WireError>>) -> Result<T, WireError> {
    let mut errors = Vec::new();
    for a in answers {
        match a {
            Ok(v) => return Ok(v),
            Err(e) => errors.push(e),
        }
    }
    errors.sort_by_key(|e| e.code == ErrorCode::TrackerUnavailable);
    Err(errors.into_iter().next().unwrap_or_else(no_tracker))
}

/// Files from several trackers, one entry per ID, sorted as a tracker sorts them (name, ID);
/// an error only if every tracker failed.
fn merge_files(
    answers: Vec<Result<Vec<FileSummary>, WireError>>,
) -> Result<Vec<FileSummary>, WireError> {
    let mut by_id: HashMap<FileId, FileSummary> = HashMap::new();
    let mut errors = Vec::new();
    let mut any = false;
    for a in answers {
        match a {
            Ok(files) => {
                any = true;
                for f in files {
                    let merged = match by_id.remove(&f.id) {
                        Some(known) => larger(known, f),
                        None => f,
                    };
                    by_id.insert(merged.id, merged);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if !any {
        return first_ok::<Vec<FileSummary>>(errors.into_iter().map(Err).collect());
    }
    let mut files: Vec<FileSummary> = by_id.into_values().collect();
    files.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    Ok(files)
}

/// Two trackers' summaries of one file: the larger counts (one may have heard of a holder
/// the other has not yet).
fn larger(a: FileSummary, b: FileSummary) -> FileSummary {
    FileSummary {
        seeders: a.seeders.max(b.seeders),
        holders: a.holders.max(b.holders),
        ..a
    }
}

/// What two trackers say a holder holds (an empty bitfield of length 0 says nothing).
fn union(a: &p2p_schema::Bitfield, b: &p2p_schema::Bitfield) -> p2p_schema::Bitfield {
    if a.len() != b.len() {
        return if a.len() >= b.len() {
            a.clone()
        } else {
            b.clone()
        };
    }
    let mut out = a.clone();
    for i in b.added_since(a) {
        out.set(i);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:7070")).collect()
    }

    #[test]
    fn every_file_gets_distinct_homes_and_the_load_spreads() {
        let list = addresses(3);
        let mut load = [0usize; 3];
        for k in 0..3000u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&k.to_be_bytes());
            let h = homes(&list, &FileId(id), 2);
            assert_eq!(h.len(), 2);
            assert_ne!(h[0], h[1]);
            assert_eq!(h, homes(&list, &FileId(id), 2), "not deterministic");
            for i in h {
                load[i] += 1;
            }
        }
        // 6,000 records over 3 trackers: each near 2,000.
        for l in load {
            assert!((1700..2300).contains(&l), "{load:?}");
        }
    }

    #[test]
    fn a_tracker_added_takes_files_only_from_the_others_never_shuffles_them() {
        let three = addresses(3);
        let four = addresses(4);
        let mut moved = 0;
        for k in 0..2000u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&k.to_be_bytes());
            let before = homes(&three, &FileId(id), 1)[0];
            let after = homes(&four, &FileId(id), 1)[0];
            if before != after {
                assert_eq!(after, 3, "a file moved between two old trackers");
                moved += 1;
            }
        }
        // About a quarter move to the new tracker.
        assert!((350..650).contains(&moved), "{moved}");
    }

    #[test]
    fn more_replicas_than_trackers_means_every_tracker() {
        let list = addresses(2);
        let mut h = homes(&list, &FileId([1; 32]), 5);
        h.sort();
        assert_eq!(h, vec![0, 1]);
    }
}
