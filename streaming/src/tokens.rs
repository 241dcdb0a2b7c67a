//! Single-use request tokens, as upstream's requestCache: a random URL-safe token per request,
//! valid for a fixed time, consumed by the first lookup, at most `MAX_IN_FLIGHT` outstanding.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use deckhand_proto::cri;

/// Upstream's `maxInFlight`.
pub(crate) const MAX_IN_FLIGHT: usize = 1000;
/// Random bytes per token (upstream: 8).
const TOKEN_BYTES: usize = 8;

/// A request waiting for its client.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
    PortForward(cri::PortForwardRequest),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("maximum number of in-flight requests exceeded")]
    Full,
    #[error("no randomness for a token: {0}")]
    Random(String),
}

pub(crate) struct TokenCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Pending, Instant)>>,
}

impl TokenCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        TokenCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Pending, Instant)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `req` and returns its new token.
    pub(crate) fn insert(&self, req: Pending) -> Result<String, TokenError> {
        let now = Instant::now();
        let mut entries = self.lock();
        entries.retain(|_, (_, expiry)| *expiry > now);
        if entries.len() >= MAX_IN_FLIGHT {
            return Err(TokenError::Full);
        }
        loop {
            let mut raw = [0u8; TOKEN_BYTES];
            getrandom::fill(&mut raw).map_err(|e| TokenError::Random(e.to_string()))?;
            let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
            if !entries.contains_key(&token) {
                entries.insert(token.clone(), (req, now + self.ttl));
                return Ok(token);
            }
        }
    }

    /// Takes the request stored under `token`, if it exists and has not expired.
    pub(crate) fn consume(&self, token: &str) -> Option<Pending> {
        let (req, expiry) = self.lock().remove(token)?;
        (expiry > Instant::now()).then_some(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pf() -> Pending {
        Pending::PortForward(cri::PortForwardRequest {
            pod_sandbox_id: "p".into(),
            port: vec![80],
        })
    }

    #[test]
    fn tokens_are_single_use_and_expire() {
        let cache = TokenCache::new(Duration::from_millis(50));
        let a = cache.insert(pf()).expect("insert");
        let b = cache.insert(pf()).expect("insert");
        assert_ne!(a, b);
        assert!(
            a.len() >= 11
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert!(cache.consume(&a).is_some());
        assert!(cache.consume(&a).is_none(), "reused");
        assert!(cache.consume("nope").is_none());
        std::thread::sleep(Duration::from_millis(80));
        assert!(cache.consume(&b).is_none(), "expired");
    }

    #[test]
    fn in_flight_requests_are_bounded() {
        let cache = TokenCache::new(Duration::from_secs(60));
        for _ in 0..MAX_IN_FLIGHT {
            cache.insert(pf()).expect("insert");
        }
        assert!(matches!(cache.insert(pf()), Err(TokenError::Full)));
    }
}
