//! API keys (`API_KEYS`): who may manage the catalog and read analytics. Tracking endpoints stay
//! open (players cannot keep a secret). With no keys configured the service runs open, and says
//! so at start-up and on `/readyz`.
//!
//! A key is sent as `Authorization: Bearer <key>` or `X-API-Key: <key>`. Scopes: `admin` (the
//! catalog's writes, and everything `read` may do), `read` (an ad by id, analytics) and `ingest`
//! (reserved for server-to-server event callers; it grants nothing beyond the open tracking
//! endpoints yet).

use std::{collections::HashMap, sync::Arc};

use poem::{Endpoint, EndpointExt, Request, web::RequestBody};
use poem_openapi::{ApiExtractor, ExtractParamOptions, SecurityScheme, auth};
use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::Hasher;

use super::error::ApiError;

/// The header a key may come in instead of `Authorization: Bearer`. A constant, not a string:
/// looking a header up by `&str` parses the name again on every request.
const X_API_KEY: poem::http::HeaderName = poem::http::HeaderName::from_static("x-api-key");

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Everything, including catalog writes.
    Admin,
    /// Reads: an ad by id, analytics.
    Read,
    /// Sending events on behalf of clients (server-side callers).
    Ingest,
}

impl Scope {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Self::Admin),
            "read" => Some(Self::Read),
            "ingest" => Some(Self::Ingest),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Read => "read",
            Self::Ingest => "ingest",
        }
    }
}

/// The configured keys. Keys are kept as hashes, so that a memory dump or a `{:?}` shows none.
#[derive(Clone, Default)]
pub struct ApiKeys {
    by_hash: HashMap<u128, Vec<Scope>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.by_hash.len())
    }
}

fn fingerprint(key: &str) -> u128 {
    let mut h = SipHasher13::new_with_keys(0x6b65_7973, 0x6164_6265_6163_6f6e);
    h.write(key.as_bytes());
    h.finish128().as_u128()
}

/// Whether `headers` carry an API key at all (`Authorization: Bearer` or `X-API-Key`), so that
/// requests without one skip hashing it. One pass over the names: a tracking request has a
/// handful of headers, and two look-ups hash and probe twice (about 290 instructions of a
/// click, against about 60 for the pass; callgrind).
pub fn carries_key(headers: &poem::http::HeaderMap) -> bool {
    headers.keys().any(|name| name == poem::http::header::AUTHORIZATION || name == X_API_KEY)
}

/// The key of an `Authorization: Bearer <key>` value. The scheme's name is case-insensitive
/// (RFC 9110, 11.1), as poem's extractor takes it on the catalog's and admin's endpoints: an
/// ingest key sent as `bearer <key>` was taken there and ignored here, on the tracking routes.
fn bearer_key(value: &str) -> Option<&str> {
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(key)
}

impl ApiKeys {
    /// Parses `scope:key,scope:key`; empty means none (open). Errors never show a key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut by_hash: HashMap<u128, Vec<Scope>> = HashMap::new();
        for (i, pair) in text.split(',').map(str::trim).filter(|p| !p.is_empty()).enumerate() {
            let (scope, key) =
                pair.split_once(':').ok_or_else(|| format!("entry {} is not scope:key", i + 1))?;
            let scope = Scope::parse(scope.trim())
                .ok_or_else(|| format!("entry {} has a scope other than admin, read or ingest", i + 1))?;
            let key = key.trim();
            if key.len() < 16 {
                return Err(format!("the key of entry {} is shorter than 16 characters", i + 1));
            }
            by_hash.entry(fingerprint(key)).or_default().push(scope);
        }
        Ok(Self { by_hash })
    }

    /// True when no key is configured: every operation is open.
    pub fn is_open(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Whether the request's headers carry a key with `scope` (admin covers every scope). Never
    /// true while no key is configured: an open service has no callers it can vouch for.
    pub fn grants(&self, headers: &poem::http::HeaderMap, scope: Scope) -> bool {
        if self.is_open() {
            return false;
        }
        let bearer =
            headers.get(poem::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_key);
        let key = bearer.or_else(|| headers.get(X_API_KEY).and_then(|v| v.to_str().ok()));
        key.and_then(|k| self.by_hash.get(&fingerprint(k.trim())))
            .is_some_and(|scopes| scopes.iter().any(|s| *s == scope || *s == Scope::Admin))
    }

    /// Ok when `credentials` carry a key with `scope` (admin covers every scope), or when no key
    /// is configured; 401 for a missing or unknown key, 403 for a key without the scope.
    pub fn require(&self, credentials: &Credentials, scope: Scope) -> Result<(), ApiError> {
        if self.is_open() {
            return Ok(());
        }
        let key = match credentials {
            Credentials::Bearer(b) => b.0.token.as_str(),
            Credentials::Header(k) => k.0.key.as_str(),
            Credentials::None => {
                return Err(ApiError::unauthorized(
                    "an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>",
                ));
            }
        };
        let Some(scopes) = self.by_hash.get(&fingerprint(key)) else {
            return Err(ApiError::unauthorized("this API key is not valid"));
        };
        if scopes.iter().any(|s| *s == scope || *s == Scope::Admin) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("this API key lacks the {} scope", scope.as_str())))
        }
    }
}

/// An operation transform (`#[oai(transform = "admin_first")]`): the admin scope is checked
/// before the operation reads its parameters and body.
pub fn admin_first<E: Endpoint>(ep: E) -> impl Endpoint<Output = E::Output> {
    key_first(ep, Scope::Admin)
}

/// An operation transform (`#[oai(transform = "read_first")]`): the read scope is checked
/// before the operation reads its parameters and body.
pub fn read_first<E: Endpoint>(ep: E) -> impl Endpoint<Output = E::Output> {
    key_first(ep, Scope::Read)
}

/// Checks the request's key for `scope` before `ep` runs, so that a caller without a valid key
/// gets 401 or 403 and learns nothing about the request it may not make (no 400, 413 or 415 about
/// its body first). The keys come from the request's data (the front endpoint puts them there);
/// the credentials are read by the operation's own extractor, so both checks agree. The handler
/// checks again ([`ApiKeys::require`]): an operation without the transform stays protected.
fn key_first<E: Endpoint>(ep: E, scope: Scope) -> impl Endpoint<Output = E::Output> {
    ep.before(move |req: Request| async move {
        // Absent while the service is open (the front endpoint hands them over only when set).
        if let Some(keys) = req.data::<Arc<ApiKeys>>().cloned() {
            let mut no_body = RequestBody::default();
            let credentials =
                Credentials::from_request(&req, &mut no_body, ExtractParamOptions::default()).await?;
            keys.require(&credentials, scope)?;
        }
        Ok(req)
    })
}

/// `Authorization: Bearer <key>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer")]
pub struct BearerKey(auth::Bearer);

/// `X-API-Key: <key>`.
#[derive(SecurityScheme)]
#[oai(ty = "api_key", key_name = "X-API-Key", key_in = "header")]
pub struct HeaderKey(auth::ApiKey);

/// The credentials a request carries, if any (checked against API_KEYS by [`ApiKeys::require`]).
#[derive(SecurityScheme)]
pub enum Credentials {
    /// A bearer token.
    Bearer(BearerKey),
    /// An X-API-Key header.
    Header(HeaderKey),
    /// None: allowed while API_KEYS is empty.
    #[oai(fallback)]
    None,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_noticed_under_either_header_and_only_there() {
        use poem::http::{HeaderMap, HeaderValue, header};
        let with = |name: poem::http::HeaderName| {
            let mut h = HeaderMap::new();
            h.insert(header::USER_AGENT, HeaderValue::from_static("player"));
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(name, HeaderValue::from_static("k"));
            h
        };
        assert!(carries_key(&with(header::AUTHORIZATION)));
        assert!(carries_key(&with(poem::http::HeaderName::from_static("x-api-key"))));
        assert!(!carries_key(&with(poem::http::HeaderName::from_static("x-api-keys"))));
        assert!(!carries_key(&with(header::PROXY_AUTHORIZATION)));
        assert!(!carries_key(&HeaderMap::new()));
    }

    #[test]
    fn a_bearer_key_is_granted_whatever_the_case_of_the_scheme() {
        use poem::http::{HeaderMap, HeaderValue, header};
        let keys = ApiKeys::parse("ingest:iiiiiiiiiiiiiiii").unwrap();
        let grants = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            keys.grants(&h, Scope::Ingest)
        };
        for value in ["Bearer iiiiiiiiiiiiiiii", "bearer iiiiiiiiiiiiiiii", "BEARER  iiiiiiiiiiiiiiii"] {
            assert!(grants(value), "{value}");
        }
        for value in ["Basic iiiiiiiiiiiiiiii", "Bearer", "Beareriiiiiiiiiiiiiiii", "bearer wrongwrongwrong1"]
        {
            assert!(!grants(value), "{value}");
        }
    }

    fn bearer(key: &str) -> Credentials {
        Credentials::Bearer(BearerKey(auth::Bearer { token: key.into() }))
    }

    #[test]
    fn keys_parse_and_scopes_apply() {
        let keys =
            ApiKeys::parse("admin:aaaaaaaaaaaaaaaa, read:rrrrrrrrrrrrrrrr,ingest:iiiiiiiiiiiiiiii").unwrap();
        assert!(keys.require(&bearer("aaaaaaaaaaaaaaaa"), Scope::Read).is_ok());
        assert!(keys.require(&bearer("rrrrrrrrrrrrrrrr"), Scope::Read).is_ok());
        assert!(matches!(
            keys.require(&bearer("rrrrrrrrrrrrrrrr"), Scope::Admin),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            keys.require(&bearer("nope-nope-nope-nope"), Scope::Read),
            Err(ApiError::Unauthorized(..))
        ));
        assert!(matches!(keys.require(&Credentials::None, Scope::Read), Err(ApiError::Unauthorized(..))));
        assert!(ApiKeys::parse("").unwrap().require(&Credentials::None, Scope::Admin).is_ok());
    }

    #[test]
    fn bad_entries_never_show_the_key() {
        for bad in ["admin", "root:aaaaaaaaaaaaaaaa", "read:tiny7"] {
            let e = ApiKeys::parse(bad).unwrap_err();
            assert!(!e.contains("aaaa") && !e.contains("tiny7"), "{e}");
        }
        assert!(!format!("{:?}", ApiKeys::parse("admin:aaaaaaaaaaaaaaaa").unwrap()).contains("aaaa"));
    }
}
