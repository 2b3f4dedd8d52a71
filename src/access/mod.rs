//! Who may call the API (CONTRACT §2 `AUTH_MODE`): nobody is asked (`none`), the one
//! shared token (`token`), or Kubernetes identities (`kubernetes`) — a bearer token is
//! validated with a TokenReview for our audience, and each request's permission is
//! asked of the API server with a SubjectAccessReview. Both answers are cached briefly
//! (AUTH_CACHE_TTL) in bounded caches, so a warm caller costs a hash and a map look-up.
//!
//! Every yes and no in `kubernetes` mode is the API server's: this module only builds the
//! reviews ([`Permission`] says what is asked). It knows nothing of HTTP; the HTTP layer
//! maps [`Denied`] to 401, 403 and 503.

mod cache;
mod permission;

pub(crate) use permission::{Permission, Verb};

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;

use crate::config::{AuthMode, Config};
use cache::TtlCache;

/// Most identities and most decisions kept: enough for every workload of a large
/// cluster, small enough that a flood of random tokens cannot grow the process.
const CACHE_ENTRIES: usize = 10_000;

/// A Kubernetes user as the API server reported it for a token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Identity {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Identity {
    /// The namespace of a ServiceAccount's identity (`system:serviceaccount:<ns>:<name>`).
    pub fn service_account_namespace(&self) -> Option<&str> {
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':').map(|(ns, _)| ns)
    }
}

/// Who is calling, once authenticated.
#[derive(Clone, Debug)]
pub(crate) enum Caller {
    /// No authorization applies: AUTH_MODE none or token, or the static API_TOKEN.
    Trusted,
    /// A Kubernetes identity: every request is authorized by the API server.
    Kubernetes(Arc<Identity>),
}

impl Caller {
    /// Where this caller's events are posted to: its ServiceAccount's namespace (other
    /// identities, and trusted callers, post cluster-wide).
    pub fn home_namespace(&self) -> Option<&str> {
        match self {
            Caller::Trusted => None,
            Caller::Kubernetes(id) => id.service_account_namespace(),
        }
    }
}

/// Why a request may not go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Denied {
    /// No token, a token not valid for our audience, or not the API token: 401.
    #[error("authorization: {0}")]
    Unauthenticated(&'static str),
    /// The API server said no: 403 naming what was missing.
    #[error("forbidden: this identity may not {0}")]
    Forbidden(Permission),
    /// The API server could not be asked: 503 (the details go to the log).
    #[error("access review failed: {0}")]
    Unavailable(String),
}

/// The API's gate: built once per process from the configuration.
pub(crate) struct Gate {
    mode: AuthMode,
    api_token: Option<String>,
    reviewer: Option<Reviewer>,
}

impl Gate {
    /// The gate AUTH_MODE asks for; `kubernetes` needs a Kubernetes client.
    pub fn new(cfg: &Config, client: Option<kube::Client>) -> anyhow::Result<Gate> {
        let mode = cfg.auth();
        let reviewer = match (mode, client) {
            (AuthMode::Kubernetes, Some(client)) => Some(Reviewer {
                client,
                audience: cfg.auth_audience.clone(),
                identities: TtlCache::new(CACHE_ENTRIES, cfg.auth_cache_ttl),
                decisions: TtlCache::new(CACHE_ENTRIES, cfg.auth_cache_ttl),
            }),
            (AuthMode::Kubernetes, None) => anyhow::bail!(
                "AUTH_MODE: kubernetes needs a Kubernetes API server (in-cluster configuration or KUBECONFIG)"
            ),
            _ => None,
        };
        Ok(Gate {
            mode,
            api_token: cfg.api_token.clone(),
            reviewer,
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Who presents `bearer` (the token of an `Authorization: Bearer` header).
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, Denied> {
        let given = bearer.unwrap_or("");
        let is_api_token = self
            .api_token
            .as_deref()
            .is_some_and(|t| token_matches(given.as_bytes(), t.as_bytes()));
        match (self.mode, &self.reviewer) {
            (AuthMode::None, _) => Ok(Caller::Trusted),
            (_, _) if is_api_token => Ok(Caller::Trusted),
            (AuthMode::Kubernetes, Some(reviewer)) if !given.is_empty() => {
                reviewer.identify(given).await.map(Caller::Kubernetes)
            }
            _ => Err(Denied::Unauthenticated("a valid bearer token is required")),
        }
    }

    /// Ok when `caller` holds `permission`.
    pub async fn authorize(&self, caller: &Caller, permission: Permission) -> Result<(), Denied> {
        if self.allowed(caller, &permission).await? {
            Ok(())
        } else {
            Err(Denied::Forbidden(permission))
        }
    }

    /// Whether `caller` holds `permission` (for filtering what a list shows).
    pub async fn allowed(&self, caller: &Caller, permission: &Permission) -> Result<bool, Denied> {
        match (caller, &self.reviewer) {
            (Caller::Trusted, _) => Ok(true),
            (Caller::Kubernetes(identity), Some(reviewer)) => {
                reviewer.decide(identity, permission).await
            }
            // a Kubernetes caller exists only where a reviewer does
            (Caller::Kubernetes(_), None) => Ok(false),
        }
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timing.
pub(crate) fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, b) in expected.iter().enumerate() {
        diff |= usize::from(b ^ given.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// Asks the API server, remembering its answers for a while.
struct Reviewer {
    client: kube::Client,
    audience: String,
    /// By the SHA-256 of the token (the token itself is never kept): who it is, or
    /// `None` for a token the API server refused.
    identities: TtlCache<[u8; 32], Option<Arc<Identity>>>,
    decisions: TtlCache<(Arc<Identity>, Permission), bool>,
}

impl Reviewer {
    async fn identify(&self, token: &str) -> Result<Arc<Identity>, Denied> {
        use sha2::Digest as _;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let known = match self.identities.get(&digest) {
            Some(known) => known,
            None => {
                let found = self.review_token(token).await?;
                self.identities.insert(digest, found.clone());
                found
            }
        };
        known.ok_or(Denied::Unauthenticated(
            "the bearer token is not a valid Kubernetes token for this audience",
        ))
    }

    async fn review_token(&self, token: &str) -> Result<Option<Arc<Identity>>, Denied> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = kube::Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Denied::Unavailable(format!("TokenReview: {e}")))?;
        let Some(status) = answer.status else {
            return Ok(None);
        };
        // the API server confirms the audiences it validated; audience-unaware
        // authenticators answer without ours, and such tokens are not for us
        let for_us = status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience));
        match (status.authenticated, status.user, for_us) {
            (Some(true), Some(user), true) => Ok(Some(Arc::new(Identity {
                username: user.username.unwrap_or_default(),
                uid: user.uid.unwrap_or_default(),
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
            }))),
            _ => Ok(None),
        }
    }

    async fn decide(
        &self,
        identity: &Arc<Identity>,
        permission: &Permission,
    ) -> Result<bool, Denied> {
        let key = (identity.clone(), permission.clone());
        if let Some(allowed) = self.decisions.get(&key) {
            return Ok(allowed);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(identity.username.clone()),
                uid: Some(identity.uid.clone()).filter(|u| !u.is_empty()),
                groups: Some(identity.groups.clone()),
                extra: Some(identity.extra.clone()).filter(|e| !e.is_empty()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(permission::API_GROUP.to_string()),
                    resource: Some(permission.resource.as_str().to_string()),
                    verb: Some(permission.verb.as_str().to_string()),
                    namespace: permission.namespace.clone(),
                    name: permission.name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = kube::Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Denied::Unavailable(format!("SubjectAccessReview: {e}")))?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        self.decisions.insert(key, allowed);
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret1", b"secret"));
        assert!(!token_matches(b"", b"secret"));
    }

    #[test]
    fn service_account_namespaces() {
        let id = |u: &str| Identity {
            username: u.into(),
            uid: String::new(),
            groups: vec![],
            extra: Default::default(),
        };
        assert_eq!(
            id("system:serviceaccount:team-a:writer").service_account_namespace(),
            Some("team-a")
        );
        assert_eq!(id("alice").service_account_namespace(), None);
        assert_eq!(
            id("system:serviceaccount:x").service_account_namespace(),
            None
        );
    }
}
