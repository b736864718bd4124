//! [`ConnectionCaps`]: how many connections a server holds at once, in all and per remote
//! address, so that one host (or many) cannot take every slot or every file descriptor.
//! A connection over either cap is refused at once (closed without a word).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The caps and the connections they currently count.
#[derive(Clone)]
pub struct ConnectionCaps {
    total: usize,
    per_address: usize,
    held: Arc<Mutex<Held>>,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many connections ({0} at most)")]
    Total(usize),
    #[error("too many connections from one address ({0} at most)")]
    PerAddress(usize),
}

/// One admitted connection's place under the caps, given back when dropped.
pub struct Slot {
    held: Arc<Mutex<Held>>,
    ip: IpAddr,
}

impl ConnectionCaps {
    /// At most `total` connections in all and `per_address` from any one IP address.
    pub fn new(total: usize, per_address: usize) -> ConnectionCaps {
        ConnectionCaps {
            total,
            per_address,
            held: Arc::default(),
        }
    }

    /// Admits a connection from `ip` if both caps allow it.
    pub fn admit(&self, ip: IpAddr) -> Result<Slot, Refused> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.total >= self.total {
            return Err(Refused::Total(self.total));
        }
        let n = held.by_address.entry(ip).or_insert(0);
        if *n >= self.per_address {
            return Err(Refused::PerAddress(self.per_address));
        }
        *n += 1;
        held.total += 1;
        Ok(Slot {
            held: self.held.clone(),
            ip,
        })
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.by_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_caps_hold_and_slots_come_back() {
        let caps = ConnectionCaps::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = caps.admit(a).unwrap();
        let _a2 = caps.admit(a).unwrap();
        assert_eq!(caps.admit(a).err(), Some(Refused::PerAddress(2)));
        let _b1 = caps.admit(b).unwrap();
        assert_eq!(caps.admit(b).err(), Some(Refused::Total(3)));
        drop(a1);
        assert_eq!(caps.held(), 2);
        let _a3 = caps.admit(a).unwrap();
        assert_eq!(caps.held(), 3);
    }
}
