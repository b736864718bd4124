//! [`Secret`]: a swarm secret as flags and configuration files carry it, never shown by
//! `Debug` (so no `debug!` of a settings struct can log it).

/// A secret string. `Debug` prints `Secret(..)`; the value is reached only by
/// [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "lifecycle",
    derive(serde::Serialize, serde::Deserialize),
    serde(transparent)
)]
pub struct Secret(String);

impl Secret {
    /// The secret's text, for deriving a key from it. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_never_shows_the_secret() {
        let s: super::Secret = "hunter2".parse().unwrap();
        assert_eq!(
            format!("{s:?} {:?}", Some(s.clone())),
            "Secret(..) Some(Secret(..))"
        );
        assert_eq!(s.expose(), "hunter2");
    }
}
