//! Identifiers: [`FileId`] and [`PeerId`], each with one lowercase-hex form for display and
//! parsing, and a compact byte-string form on the wire.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Parses exactly `N` bytes of hex (either case).
fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Is `s` a non-empty string of hex digits (a possible ID prefix)?
pub fn is_hex_prefix(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_hexdigit())
}

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:expr, $what:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// The full lowercase hex form.
            pub fn to_hex(&self) -> String {
                to_hex(&self.0)
            }

            /// The first 12 hex digits, for compact display.
            pub fn short(&self) -> String {
                let mut s = self.to_hex();
                s.truncate(12);
                s
            }

            /// From a byte slice of exactly [`Self::LEN`] bytes (a database key, say).
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                bytes.try_into().ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                from_hex::<$len>(s)
                    .map(Self)
                    .ok_or_else(|| format!("not a {}: expected {} hex digits", $what, $len * 2))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_hex())
                } else {
                    s.serialize_bytes(&self.0)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "{} bytes or {} hex digits", $len, $len * 2)
                    }
                    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<$name, E> {
                        $name::from_slice(v).ok_or_else(|| E::invalid_length(v.len(), &self))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                if d.is_human_readable() {
                    d.deserialize_str(V)
                } else {
                    d.deserialize_bytes(V)
                }
            }
        }
    };
}

byte_id!(
    /// A file's identity: SHA-256 over its size, chunk size and chunk hashes
    /// (see [`crate::Manifest::file_id`]). The same bytes registered twice are one file.
    FileId,
    32,
    "file ID"
);

byte_id!(
    /// A peer daemon's identity: 16 random bytes made once and kept in the daemon's database,
    /// so a restarted daemon is the same peer to the tracker.
    PeerId,
    16,
    "peer ID"
);

impl PeerId {
    /// A new random peer ID.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&fastrand_u64().to_be_bytes());
        b[8..].copy_from_slice(&fastrand_u64().to_be_bytes());
        PeerId(b)
    }
}

/// 64 random bits from the OS-seeded hasher, so the schema needs no RNG crate.
fn fastrand_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = FileId([0xab; 32]);
        assert_eq!(id.to_hex().len(), 64);
        assert_eq!(id.to_hex().parse::<FileId>(), Ok(id));
        assert_eq!(id.to_hex().to_uppercase().parse::<FileId>(), Ok(id));
        assert!("abc".parse::<FileId>().is_err());
        assert!("zz".repeat(32).parse::<FileId>().is_err());
        assert_eq!(id.short(), "abababababab");
    }

    #[test]
    fn cbor_is_a_byte_string() {
        let id = PeerId([7; 16]);
        let mut buf = Vec::new();
        ciborium::into_writer(&id, &mut buf).unwrap();
        // major type 2 (bytes), length 16, then the bytes.
        assert_eq!(buf.len(), 17);
        assert_eq!(buf[0], 0x50);
        let back: PeerId = ciborium::from_reader(&buf[..]).unwrap();
        assert_eq!(back, id);
    }

    #[test]
    fn random_peer_ids_differ() {
        assert_ne!(PeerId::random(), PeerId::random());
    }

    #[test]
    fn hex_prefix() {
        assert!(is_hex_prefix("3f2a"));
        assert!(!is_hex_prefix(""));
        assert!(!is_hex_prefix("doug.png"));
    }
}
