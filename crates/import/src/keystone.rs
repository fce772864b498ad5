//! Keystone token validation (`[keystone]` in the configuration), as
//! keystonemiddleware's `auth_token` does it for Glance.
//!
//! Every request's `X-Auth-Token` is checked with Keystone's Identity API v3:
//! `GET {auth_url}/v3/auth/tokens?nocatalog` with the user's token in
//! `X-Subject-Token` and vimport's own (service) token in `X-Auth-Token`. 200 gives the
//! user, the project and the role names; 404 means the token is not valid (expired,
//! revoked, made up): 401. Keystone unreachable, a 5xx, or a service user Keystone
//! refuses: 503 naming the cause, never a pass.
//!
//! The service token comes from `POST {auth_url}/v3/auth/tokens` with the service
//! user's password (project-scoped) or an application credential. It is renewed
//! [`RENEW_BEFORE`] before its `expires_at`, and at once when Keystone answers 401 to
//! a validation (the token was revoked or Keystone's keys rotated).
//!
//! Answers (valid or not) are cached for `cache_seconds` by the SHA-256 of the token
//! (tokens themselves are not kept), never past the token's own `expires_at`; a revoked
//! token is therefore refused at the latest `cache_seconds` after its revocation. The
//! cache holds at most `cache_size` answers: when full, expired answers go first, then
//! the oldest (which expires soonest anyway: every answer lives as long). Two requests
//! that miss together both ask Keystone (harmless: the answers are equal).
//!
//! Calls block (`ureq`): the HTTP layer runs [`Keystone::validate`] off the async
//! runtime. `https://` auth URLs work (rustls, the webpki root certificates; no client
//! certificates, no custom CA file); the tests use plain HTTP on loopback.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{KeystoneAuth, KeystoneConfig};
use crate::error::Error;

/// The service token is renewed this long before it expires.
pub const RENEW_BEFORE: Duration = Duration::from_secs(120);

/// Who a valid token stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// The user's id.
    pub user_id: String,
    /// The project the token is scoped to (`None`: unscoped or domain-scoped).
    pub project_id: Option<String>,
    /// Role names on that project (Keystone expands implied roles: a `member`
    /// token also names `reader`).
    pub roles: Vec<String>,
}

/// Keystone's answer about a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validation {
    /// Valid, standing for this.
    Valid(TokenInfo),
    /// Not valid (Keystone answered 404).
    Invalid,
}

#[derive(Debug)]
struct Cached {
    answer: Validation,
    until: Instant,
    seq: u64,
}

/// A bounded map of answers with expiry; eviction drops expired answers, then the
/// oldest.
#[derive(Debug)]
struct Cache {
    entries: HashMap<[u8; 32], Cached>,
    /// Keys in insertion order with the sequence number they were inserted with (a
    /// key inserted again leaves a stale pair behind, skipped when met).
    order: VecDeque<([u8; 32], u64)>,
    next_seq: u64,
    capacity: usize,
}

impl Cache {
    fn new(capacity: usize) -> Cache {
        Cache {
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            capacity: capacity.max(1),
        }
    }

    fn get(&mut self, key: &[u8; 32], now: Instant) -> Option<Validation> {
        match self.entries.get(key) {
            Some(c) if c.until > now => Some(c.answer.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: [u8; 32], answer: Validation, until: Instant, now: Instant) {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.entries.retain(|_, c| c.until > now);
            let live = &self.entries;
            self.order
                .retain(|(k, s)| live.get(k).is_some_and(|c| c.seq == *s));
            while self.entries.len() >= self.capacity {
                let Some((k, s)) = self.order.pop_front() else {
                    break;
                };
                if self.entries.get(&k).is_some_and(|c| c.seq == s) {
                    self.entries.remove(&k);
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(key, Cached { answer, until, seq });
        self.order.push_back((key, seq));
        // Stale pairs never outnumber the live ones for long.
        if self.order.len() > 2 * self.capacity {
            let live = &self.entries;
            self.order
                .retain(|(k, s)| live.get(k).is_some_and(|c| c.seq == *s));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// vimport's own token, and when to renew it.
#[derive(Debug)]
struct ServiceToken {
    token: String,
    renew_at: Instant,
}

/// A Keystone client validating users' tokens.
#[derive(Debug)]
pub struct Keystone {
    config: KeystoneConfig,
    agent: ureq::Agent,
    service_token: Mutex<Option<ServiceToken>>,
    cache: Mutex<Cache>,
}

#[derive(Deserialize)]
struct TokenBody {
    token: TokenData,
}

#[derive(Deserialize)]
struct TokenData {
    user: Named,
    project: Option<Named>,
    #[serde(default)]
    roles: Vec<Role>,
    expires_at: String,
}

#[derive(Deserialize)]
struct Named {
    id: String,
}

#[derive(Deserialize)]
struct Role {
    name: String,
}

impl Keystone {
    /// A client for `config` (nothing is asked of Keystone until the first request).
    pub fn new(config: KeystoneConfig) -> Keystone {
        let timeout = Duration::from_secs(config.timeout);
        Keystone {
            cache: Mutex::new(Cache::new(config.cache_size)),
            agent: ureq::AgentBuilder::new()
                .redirects(0)
                .timeout_connect(timeout)
                .timeout(timeout)
                .build(),
            service_token: Mutex::new(None),
            config,
        }
    }

    /// `auth_url` without a trailing `/` or `/v3`.
    fn base(&self) -> &str {
        let u = self.config.auth_url.trim_end_matches('/');
        u.strip_suffix("/v3").unwrap_or(u)
    }

    /// The 503 for Keystone failing `what`, also logged: the client sees only the answer,
    /// the operator needs the cause in the log.
    fn unavailable(&self, what: &str) -> Error {
        tracing::warn!("Keystone at {} {what}", self.config.auth_url);
        Error::Unavailable(format!(
            "cannot validate the token: Keystone at {} {what}; try again later (operator: \
             check that Keystone is up and [keystone] auth_url is right)",
            self.config.auth_url
        ))
    }

    /// Validates `token` (cached answer, else Keystone). Blocks.
    pub fn validate(&self, token: &str) -> Result<Validation, Error> {
        let key = key_of(token);
        if let Some(v) = self
            .cache
            .lock()
            .map_err(Error::internal)?
            .get(&key, Instant::now())
        {
            return Ok(v);
        }
        let (answer, expires) = match self.ask(token, false)? {
            Asked::Valid(info, expires) => (Validation::Valid(info), Some(expires)),
            Asked::Invalid => (Validation::Invalid, None),
            Asked::ServiceTokenRefused => match self.ask(token, true)? {
                Asked::Valid(info, expires) => (Validation::Valid(info), Some(expires)),
                Asked::Invalid => (Validation::Invalid, None),
                Asked::ServiceTokenRefused => {
                    return Err(
                        self.unavailable("refuses vimport's own token even when just issued (401)")
                    )
                }
            },
        };
        let now = Instant::now();
        let mut until = now + Duration::from_secs(self.config.cache_seconds);
        if let Some(left) = expires.map(|e| remaining(e, unix_now())) {
            until = until.min(now + left);
        }
        if until > now {
            self.cache
                .lock()
                .map_err(Error::internal)?
                .insert(key, answer.clone(), until, now);
        }
        Ok(answer)
    }

    /// One `GET /v3/auth/tokens` for `token` (with a fresh service token when
    /// `renew`).
    fn ask(&self, token: &str, renew: bool) -> Result<Asked, Error> {
        let service = self.service_token(renew)?;
        let url = format!("{}/v3/auth/tokens?nocatalog", self.base());
        let resp = match self
            .agent
            .get(&url)
            .set("X-Auth-Token", &service)
            .set("X-Subject-Token", token)
            .set("Accept", "application/json")
            .call()
        {
            Ok(r) => r,
            Err(ureq::Error::Status(404, _)) => return Ok(Asked::Invalid),
            Err(ureq::Error::Status(401, _)) => {
                if let Ok(mut t) = self.service_token.lock() {
                    *t = None;
                }
                return Ok(Asked::ServiceTokenRefused);
            }
            Err(ureq::Error::Status(403, _)) => {
                return Err(self.unavailable(
                    "does not let vimport's service user validate tokens (403): give it the \
                     `service` (or `admin`) role",
                ))
            }
            Err(ureq::Error::Status(code, _)) => {
                return Err(self.unavailable(&format!("answered HTTP {code}")))
            }
            Err(e) => return Err(self.unavailable(&format!("is unreachable ({e})"))),
        };
        // ureq reads at most 10 MB of a body (and `nocatalog` keeps it small).
        let body: TokenBody = resp
            .into_string()
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            .map_err(|e| {
                self.unavailable(&format!("answered a token body we cannot read ({e})"))
            })?;
        let expires = parse_rfc3339(&body.token.expires_at).ok_or_else(|| {
            self.unavailable(&format!(
                "answered an expires_at we cannot read ({:?})",
                body.token.expires_at
            ))
        })?;
        // Keystone answers 404 for expired tokens; a clock skew must not make one pass.
        if expires <= unix_now() {
            return Ok(Asked::Invalid);
        }
        Ok(Asked::Valid(
            TokenInfo {
                user_id: body.token.user.id,
                project_id: body.token.project.map(|p| p.id),
                roles: body.token.roles.into_iter().map(|r| r.name).collect(),
            },
            expires,
        ))
    }

    /// vimport's own token: the current one, or a new one when it is due for renewal,
    /// missing, or `renew`.
    fn service_token(&self, renew: bool) -> Result<String, Error> {
        let mut slot = self.service_token.lock().map_err(Error::internal)?;
        if let Some(t) = slot.as_ref() {
            if !renew && Instant::now() < t.renew_at {
                return Ok(t.token.clone());
            }
        }
        let url = format!("{}/v3/auth/tokens?nocatalog", self.base());
        let resp = match self
            .agent
            .post(&url)
            .set("Accept", "application/json")
            .set("Content-Type", "application/json")
            .send_string(&self.auth_request().to_string())
        {
            Ok(r) => r,
            Err(ureq::Error::Status(code @ (400 | 401 | 403 | 404), _)) => {
                return Err(self.unavailable(&format!(
                    "refuses vimport's service credentials (HTTP {code}): check [keystone] \
                     username/password/project or the application credential"
                )))
            }
            Err(ureq::Error::Status(code, _)) => {
                return Err(
                    self.unavailable(&format!("answered HTTP {code} to vimport's own login"))
                )
            }
            Err(e) => return Err(self.unavailable(&format!("is unreachable ({e})"))),
        };
        let token = resp
            .header("X-Subject-Token")
            .map(str::to_string)
            .ok_or_else(|| self.unavailable("issued vimport's token without X-Subject-Token"))?;
        let body: serde_json::Value = resp
            .into_string()
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            .map_err(|e| self.unavailable(&format!("answered a body we cannot read ({e})")))?;
        let expires = body["token"]["expires_at"]
            .as_str()
            .and_then(parse_rfc3339)
            .ok_or_else(|| self.unavailable("issued vimport's token without expires_at"))?;
        let renew_at = Instant::now() + renew_in(remaining(expires, unix_now()));
        *slot = Some(ServiceToken {
            token: token.clone(),
            renew_at,
        });
        Ok(token)
    }

    /// The body of `POST /v3/auth/tokens` for the service's credentials.
    fn auth_request(&self) -> serde_json::Value {
        match &self.config.auth {
            KeystoneAuth::Password {
                username,
                password,
                user_domain_name,
                project_name,
                project_domain_name,
            } => serde_json::json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": username,
                    "domain": {"name": user_domain_name},
                    "password": password,
                }}},
                "scope": {"project": {
                    "name": project_name,
                    "domain": {"name": project_domain_name},
                }},
            }}),
            KeystoneAuth::ApplicationCredential { id, secret } => serde_json::json!({"auth": {
                "identity": {
                    "methods": ["application_credential"],
                    "application_credential": {"id": id, "secret": secret},
                },
            }}),
        }
    }
}

enum Asked {
    Valid(TokenInfo, u64),
    Invalid,
    ServiceTokenRefused,
}

fn key_of(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Time left until `expires` (seconds since the epoch), from `now`.
fn remaining(expires: u64, now: u64) -> Duration {
    Duration::from_secs(expires.saturating_sub(now))
}

/// When to renew a token with `left` to live: [`RENEW_BEFORE`] before it expires, or
/// at half its life when it lives less than twice that.
fn renew_in(left: Duration) -> Duration {
    if left > 2 * RENEW_BEFORE {
        left - RENEW_BEFORE
    } else {
        left / 2
    }
}

/// Seconds since the epoch of an RFC 3339 UTC time as Keystone writes it
/// (`2026-12-04T17:52:38.000000Z`; fractions are dropped, `Z` or `+00:00` only).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let s = s
        .strip_suffix('Z')
        .or_else(|| s.strip_suffix("+00:00"))
        .unwrap_or(s);
    let (date, time) = s.split_once('T')?;
    let time = time.split('.').next()?;
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    let [y, mo, da] = d.as_slice() else {
        return None;
    };
    let [h, mi, se] = t.as_slice() else {
        return None;
    };
    let (y, mo, da): (i64, i64, i64) = (y.parse().ok()?, mo.parse().ok()?, da.parse().ok()?);
    let (h, mi, se): (u64, u64, u64) = (h.parse().ok()?, mi.parse().ok()?, se.parse().ok()?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days)
        .ok()
        .map(|d| d * 86_400 + h * 3600 + mi * 60 + se)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(user: &str) -> Validation {
        Validation::Valid(TokenInfo {
            user_id: user.into(),
            project_id: Some("p".into()),
            roles: vec!["reader".into()],
        })
    }

    #[test]
    fn keystone_times_parse_as_utc_fields_print_them() {
        let t = parse_rfc3339("2026-12-04T17:52:38.000000Z").unwrap();
        assert_eq!(crate::db::rfc3339(t), "2026-12-04T17:52:38Z");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2000-02-29T23:59:59+00:00"),
            Some(951_868_799)
        );
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-12-04 17:52:38Z",
            "x-y-zT1:2:3Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn service_token_is_renewed_before_it_expires() {
        assert_eq!(
            renew_in(Duration::from_secs(3600)),
            Duration::from_secs(3480)
        );
        assert_eq!(renew_in(Duration::from_secs(100)), Duration::from_secs(50));
        assert_eq!(renew_in(Duration::ZERO), Duration::ZERO);
        assert_eq!(remaining(10, 20), Duration::ZERO);
    }

    #[test]
    fn cache_answers_until_expiry_then_forgets() {
        let mut c = Cache::new(4);
        let now = Instant::now();
        c.insert(key_of("a"), valid("u"), now + Duration::from_secs(5), now);
        assert_eq!(c.get(&key_of("a"), now), Some(valid("u")));
        assert_eq!(c.get(&key_of("a"), now + Duration::from_secs(5)), None);
        assert_eq!(c.len(), 0, "an expired answer is dropped when met");
        assert_eq!(c.get(&key_of("b"), now), None);
    }

    #[test]
    fn full_cache_drops_expired_then_oldest() {
        let mut c = Cache::new(3);
        let now = Instant::now();
        let s = Duration::from_secs;
        c.insert(key_of("old"), valid("1"), now + s(100), now);
        c.insert(key_of("gone"), Validation::Invalid, now + s(1), now);
        c.insert(key_of("mid"), valid("3"), now + s(100), now);
        // Full: the expired answer makes room, nothing live is lost.
        let later = now + s(2);
        c.insert(key_of("new"), valid("4"), later + s(100), later);
        assert_eq!(c.len(), 3);
        assert!(c.get(&key_of("old"), later).is_some());
        assert!(c.get(&key_of("gone"), later).is_none());
        // Full of live answers: the oldest goes.
        c.insert(key_of("newer"), valid("5"), later + s(100), later);
        assert_eq!(c.len(), 3);
        assert!(c.get(&key_of("old"), later).is_none());
        for k in ["mid", "new", "newer"] {
            assert!(c.get(&key_of(k), later).is_some(), "{k}");
        }
        // Answering again refreshes a key without growing the cache.
        for _ in 0..10 {
            c.insert(key_of("mid"), valid("3"), later + s(100), later);
        }
        assert_eq!(c.len(), 3);
        assert!(c.order.len() <= 6);
    }
}
