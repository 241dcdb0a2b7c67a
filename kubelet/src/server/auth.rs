//! Authentication and authorization of the kubelet's API, as upstream's
//! `kubelet/server/auth.go` and the kubelet's authenticator/authorizer options.
//!
//! Authentication, in order: a client certificate verified against `clientCAFile` (the TLS
//! layer verifies it; the user is its CN and the groups its O values), a bearer token checked
//! with a TokenReview (when the webhook is enabled), then `system:anonymous` when anonymous
//! requests are enabled; otherwise 401. Authorization: AlwaysAllow, or a SubjectAccessReview
//! for `nodes/<subresource>` of this node with the verb of the HTTP method ([`attributes`]);
//! a denial is 403.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::AuthorizationMode;

/// An authenticated (or anonymous) user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The name.
    pub name: String,
    /// The UID, when the authenticator gave one.
    pub uid: Option<String>,
    /// The groups.
    pub groups: Vec<String>,
    /// Extra attributes from a TokenReview.
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

impl User {
    /// The user of a verified client certificate (DER): CN, and O as groups.
    pub fn from_certificate(der: &[u8]) -> Result<User, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("parsing the client certificate: {e}"))?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .filter(|cn| !cn.is_empty())
            .ok_or("the client certificate has no common name")?
            .to_string();
        let mut groups: Vec<String> = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_string))
            .collect();
        groups.push(AUTHENTICATED.to_string());
        Ok(User {
            name,
            uid: None,
            groups,
            extra: Default::default(),
        })
    }

    /// `system:anonymous`.
    pub fn anonymous() -> User {
        User {
            name: "system:anonymous".to_string(),
            uid: None,
            groups: vec!["system:unauthenticated".to_string()],
            extra: Default::default(),
        }
    }
}

const AUTHENTICATED: &str = "system:authenticated";

/// What a request asks for, as a SubjectAccessReview's resource attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// The verb (`get`, `create`, ...).
    pub verb: String,
    /// Always `nodes`.
    pub resource: &'static str,
    /// `proxy`, `stats`, `metrics`, `log` or `spec`.
    pub subresource: &'static str,
    /// The node's name.
    pub name: String,
}

/// upstream's `isSubpath`: `path` is `prefix` or below it.
fn is_subpath(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|r| r.starts_with('/'))
}

/// upstream's mapping of a request to attributes (`nodeAuthorizerAttributesGetter`).
pub fn attributes(method: &http::Method, path: &str, node: &str) -> Attributes {
    let verb = match *method {
        http::Method::POST => "create",
        http::Method::GET | http::Method::HEAD => "get",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "",
    };
    let subresource = if is_subpath(path, "/stats") {
        "stats"
    } else if is_subpath(path, "/metrics") {
        "metrics"
    } else if is_subpath(path, "/logs") {
        "log"
    } else if is_subpath(path, "/spec") {
        "spec"
    } else {
        "proxy"
    };
    Attributes {
        verb: verb.to_string(),
        resource: "nodes",
        subresource,
        name: node.to_string(),
    }
}

/// An authentication or authorization outcome other than "allowed".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 401.
    Unauthorized,
    /// 403, with upstream's message.
    Forbidden(String),
    /// 500: the webhook could not be asked.
    Error(String),
}

/// Answers kept for a while, as upstream's webhook caches (keyed by a digest of the question).
#[derive(Debug)]
pub struct TtlCache<V> {
    entries: Mutex<HashMap<[u8; 32], (Instant, V)>>,
}

/// The most answers a cache keeps.
const CACHE_MAX: usize = 4096;

impl<V: Clone> TtlCache<V> {
    /// An empty cache.
    pub fn new() -> TtlCache<V> {
        TtlCache {
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn key(question: &[u8]) -> [u8; 32] {
        Sha256::digest(question).into()
    }

    /// The answer to `question`, if one is kept and still valid at `now`.
    pub fn get(&self, question: &[u8], now: Instant) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&Self::key(question))
            .filter(|(until, _)| now < *until)
            .map(|(_, v)| v.clone())
    }

    /// Keeps `answer` until `now + ttl` (nothing for a zero TTL).
    pub fn put(&self, question: &[u8], answer: V, ttl: Duration, now: Instant) {
        if ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CACHE_MAX {
            entries.retain(|_, (until, _)| now < *until);
            if entries.len() >= CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(Self::key(question), (now + ttl, answer));
    }
}

impl<V: Clone> Default for TtlCache<V> {
    fn default() -> Self {
        TtlCache::new()
    }
}

/// How long webhook answers are kept.
#[derive(Debug, Clone, Copy)]
pub struct CacheTtls {
    /// TokenReview answers.
    pub token: Duration,
    /// SubjectAccessReviews that allowed.
    pub authorized: Duration,
    /// SubjectAccessReviews that denied.
    pub unauthorized: Duration,
}

/// The kubelet's authenticator and authorizer.
#[derive(Clone)]
pub struct Auth {
    /// The API client for the webhooks.
    pub client: Option<kube::Client>,
    /// `authentication.anonymous.enabled`.
    pub anonymous: bool,
    /// `authentication.webhook.enabled`.
    pub token_webhook: bool,
    /// `authorization.mode`.
    pub mode: AuthorizationMode,
    /// The node's name.
    pub node: String,
    /// The cache lifetimes.
    pub ttls: CacheTtls,
    tokens: Arc<TtlCache<Option<User>>>,
    decisions: Arc<TtlCache<bool>>,
}

impl Auth {
    /// An authenticator/authorizer with empty caches.
    pub fn new(
        client: Option<kube::Client>,
        anonymous: bool,
        token_webhook: bool,
        mode: AuthorizationMode,
        node: String,
        ttls: CacheTtls,
    ) -> Auth {
        Auth {
            client,
            anonymous,
            token_webhook,
            mode,
            node,
            ttls,
            tokens: Default::default(),
            decisions: Default::default(),
        }
    }

    /// Authenticates a request from the connection's certificate user (if any) and its
    /// `Authorization` header.
    pub async fn authenticate(
        &self,
        cert_user: Option<&User>,
        headers: &http::HeaderMap,
    ) -> Result<User, Denied> {
        if let Some(u) = cert_user {
            return Ok(u.clone());
        }
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        if let (Some(token), true, Some(client)) = (token, self.token_webhook, &self.client) {
            let known = self.tokens.get(token.as_bytes(), Instant::now());
            let answer = match known {
                Some(a) => Some(a),
                None => match token_review(client, token).await {
                    Ok(a) => {
                        let now = Instant::now();
                        self.tokens
                            .put(token.as_bytes(), a.clone(), self.ttls.token, now);
                        Some(a)
                    }
                    Err(e) => {
                        tracing::warn!("TokenReview failed: {e}");
                        None
                    }
                },
            };
            if let Some(Some(u)) = answer {
                return Ok(u);
            }
        }
        if self.anonymous {
            return Ok(User::anonymous());
        }
        Err(Denied::Unauthorized)
    }

    /// Authorizes `user` for `attrs`.
    pub async fn authorize(&self, user: &User, attrs: &Attributes) -> Result<(), Denied> {
        let describe = || {
            format!(
                "user={}, verb={}, resource={}, subresource={}",
                user.name, attrs.verb, attrs.resource, attrs.subresource
            )
        };
        match self.mode {
            AuthorizationMode::AlwaysAllow => Ok(()),
            AuthorizationMode::Webhook => {
                let Some(client) = &self.client else {
                    return Err(Denied::Error(format!(
                        "Authorization error ({}): no API server for the webhook",
                        describe()
                    )));
                };
                let review = review_for(user, attrs);
                let question = serde_json::to_vec(&review.spec).unwrap_or_default();
                let answer = match self.decisions.get(&question, Instant::now()) {
                    Some(a) => Ok(a),
                    None => {
                        let a = subject_access_review(client, review).await;
                        if let Ok(allowed) = a {
                            let ttl = if allowed {
                                self.ttls.authorized
                            } else {
                                self.ttls.unauthorized
                            };
                            self.decisions.put(&question, allowed, ttl, Instant::now());
                        }
                        a
                    }
                };
                match answer {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(Denied::Forbidden(format!("Forbidden ({})", describe()))),
                    Err(e) => {
                        tracing::warn!("SubjectAccessReview failed: {e}");
                        Err(Denied::Error(format!(
                            "Authorization error ({})",
                            describe()
                        )))
                    }
                }
            }
        }
    }
}

async fn token_review(client: &kube::Client, token: &str) -> Result<Option<User>, kube::Error> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: None,
        },
        ..Default::default()
    };
    let out = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let Some(status) = out.status else {
        return Ok(None);
    };
    if status.authenticated != Some(true) {
        return Ok(None);
    }
    let Some(info) = status.user else {
        return Ok(None);
    };
    Ok(Some(User {
        name: info.username.unwrap_or_default(),
        uid: info.uid,
        groups: info.groups.unwrap_or_default(),
        extra: info.extra.unwrap_or_default().into_iter().collect(),
    }))
}

/// The SubjectAccessReview for `user` and `attrs`.
pub fn review_for(user: &User, attrs: &Attributes) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: user.uid.clone(),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone().into_iter().collect()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(attrs.verb.clone()),
                group: Some(String::new()),
                version: Some("v1".to_string()),
                resource: Some(attrs.resource.to_string()),
                subresource: Some(attrs.subresource.to_string()),
                name: Some(attrs.name.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn subject_access_review(
    client: &kube::Client,
    review: SubjectAccessReview,
) -> Result<bool, kube::Error> {
    let out = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(out.status.is_some_and(|s| s.allowed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn upstream_attribute_mapping() {
        let a = |m: Method, p: &str| {
            let a = attributes(&m, p, "dh-node");
            assert_eq!((a.resource, a.name.as_str()), ("nodes", "dh-node"));
            (a.verb, a.subresource)
        };
        let s = |v: &str, r: &'static str| (v.to_string(), r);
        assert_eq!(a(Method::POST, "/exec/ns/pod/c"), s("create", "proxy"));
        assert_eq!(a(Method::GET, "/exec/ns/pod/c"), s("get", "proxy"));
        assert_eq!(a(Method::POST, "/attach/ns/pod/c"), s("create", "proxy"));
        assert_eq!(a(Method::POST, "/portForward/ns/pod"), s("create", "proxy"));
        assert_eq!(a(Method::POST, "/run/ns/pod/c"), s("create", "proxy"));
        assert_eq!(a(Method::GET, "/pods"), s("get", "proxy"));
        assert_eq!(a(Method::GET, "/healthz"), s("get", "proxy"));
        assert_eq!(a(Method::GET, "/containerLogs/ns/pod/c"), s("get", "proxy"));
        assert_eq!(a(Method::GET, "/logs/"), s("get", "log"));
        assert_eq!(a(Method::GET, "/logs/pods/x"), s("get", "log"));
        assert_eq!(a(Method::GET, "/stats/summary"), s("get", "stats"));
        assert_eq!(a(Method::GET, "/stats"), s("get", "stats"));
        assert_eq!(a(Method::GET, "/statsx"), s("get", "proxy"));
        assert_eq!(a(Method::GET, "/metrics/cadvisor"), s("get", "metrics"));
        assert_eq!(a(Method::GET, "/spec/"), s("get", "spec"));
        assert_eq!(a(Method::PUT, "/x"), s("update", "proxy"));
        assert_eq!(a(Method::PATCH, "/x"), s("patch", "proxy"));
        assert_eq!(a(Method::DELETE, "/x"), s("delete", "proxy"));
    }

    #[test]
    fn review_carries_the_user_and_attributes() {
        let user = User {
            name: "alice".into(),
            uid: Some("1".into()),
            groups: vec!["g".into()],
            extra: Default::default(),
        };
        let r = review_for(&user, &attributes(&Method::POST, "/exec/a/b/c", "n"));
        let ra = r.spec.resource_attributes.expect("attributes");
        assert_eq!(r.spec.user.as_deref(), Some("alice"));
        assert_eq!(r.spec.groups, Some(vec!["g".to_string()]));
        assert_eq!(ra.verb.as_deref(), Some("create"));
        assert_eq!(ra.resource.as_deref(), Some("nodes"));
        assert_eq!(ra.subresource.as_deref(), Some("proxy"));
        assert_eq!(ra.name.as_deref(), Some("n"));
        assert_eq!(ra.version.as_deref(), Some("v1"));
    }

    #[test]
    fn cache_keeps_answers_for_their_ttl() {
        let cache = TtlCache::new();
        let t0 = Instant::now();
        cache.put(b"q", true, Duration::from_secs(5), t0);
        cache.put(b"zero", true, Duration::ZERO, t0);
        assert_eq!(cache.get(b"q", t0), Some(true));
        assert_eq!(cache.get(b"q", t0 + Duration::from_secs(4)), Some(true));
        assert_eq!(cache.get(b"q", t0 + Duration::from_secs(5)), None);
        assert_eq!(cache.get(b"other", t0), None);
        assert_eq!(cache.get(b"zero", t0), None);
        for i in 0..CACHE_MAX + 10 {
            cache.put(&i.to_le_bytes(), false, Duration::from_secs(1), t0);
        }
        let n = cache.entries.lock().map(|e| e.len()).unwrap_or_default();
        assert!(n <= CACHE_MAX, "bounded: {n}");
    }

    #[tokio::test]
    async fn anonymous_only_when_enabled() {
        let ttl = Duration::from_secs(1);
        let ttls = CacheTtls {
            token: ttl,
            authorized: ttl,
            unauthorized: ttl,
        };
        let mut auth = Auth::new(
            None,
            false,
            true,
            AuthorizationMode::AlwaysAllow,
            "n".into(),
            ttls,
        );
        let headers = http::HeaderMap::new();
        assert_eq!(
            auth.authenticate(None, &headers).await,
            Err(Denied::Unauthorized)
        );
        let cert = User::anonymous();
        assert_eq!(auth.authenticate(Some(&cert), &headers).await, Ok(cert));
        auth.anonymous = true;
        assert_eq!(
            auth.authenticate(None, &headers).await,
            Ok(User::anonymous())
        );
        auth.mode = AuthorizationMode::Webhook;
        let attrs = attributes(&Method::GET, "/pods", "n");
        assert!(matches!(
            auth.authorize(&User::anonymous(), &attrs).await,
            Err(Denied::Error(_))
        ));
    }
}
