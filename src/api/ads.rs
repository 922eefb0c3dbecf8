//! Ad catalog endpoints: `GET /ads`, the old services' list of active ads for players (open), and
//! the catalog's management for ad ops (`POST /ads`, `GET/PUT/DELETE /ads/{id}`, behind API keys).

use std::sync::Arc;

use poem_openapi::{
    ApiResponse, Object, OpenApi,
    param::{Header, Path},
    payload::Json,
};
use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    ApiTags, State,
    auth::{Credentials, Scope, admin_first, read_first},
    body::JsonBody,
    error::{ApiError, ErrorBody},
};
use crate::{
    domain::{Ad, MAX_URL_LEN, is_http_url},
    store::catalog::WriteLock,
};

/// An active ad as players see it (field names as the old service had them).
#[derive(Debug, Object)]
#[oai(example)]
pub struct AdSummary {
    /// The ad's id; send it with every event.
    pub id: String,
    /// The ad's name.
    pub name: String,
    /// The creative to play.
    pub video_url: String,
    /// Where a click leads.
    pub target_url: String,
}

impl poem_openapi::types::Example for AdSummary {
    fn example() -> Self {
        AdSummary {
            id: "11111111-1111-1111-1111-111111111111".into(),
            name: "Winter Sale".into(),
            video_url: "https://cdn.example.com/winter.mp4".into(),
            target_url: "https://shop.example.com/winter".into(),
        }
    }
}

impl From<&Ad> for AdSummary {
    fn from(a: &Ad) -> Self {
        AdSummary {
            id: a.id.to_string(),
            name: a.name.clone(),
            video_url: a.video_url.clone(),
            target_url: a.target_url.clone(),
        }
    }
}

/// Answer of `GET /ads`.
#[derive(Debug, ApiResponse)]
pub enum ListAdsResponse {
    /// Every active ad, oldest first; `[]` when there are none.
    #[oai(status = 200)]
    Ok(Json<Vec<AdSummary>>),
}

/// An ad as the catalog holds it.
#[derive(Debug, Object)]
#[oai(example)]
pub struct AdDetail {
    /// The ad's id; send it with every event.
    pub id: Uuid,
    /// The ad's name.
    pub name: String,
    /// The creative to play.
    pub video_url: String,
    /// Where a click leads.
    pub target_url: String,
    /// False once retired: it leaves `GET /ads`, and its events still count.
    pub active: bool,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it last changed.
    pub updated_at: OffsetDateTime,
    /// Increases with every change.
    pub version: u64,
}

impl poem_openapi::types::Example for AdDetail {
    fn example() -> Self {
        let at = OffsetDateTime::from_unix_timestamp(1_763_769_600).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        AdDetail {
            id: Uuid::from_u128(0x1111_1111_1111_1111_1111_1111_1111_1111),
            name: "Winter Sale".into(),
            video_url: "https://cdn.example.com/winter.mp4".into(),
            target_url: "https://shop.example.com/winter".into(),
            active: true,
            created_at: at,
            updated_at: at,
            version: 1,
        }
    }
}

impl From<&Ad> for AdDetail {
    fn from(a: &Ad) -> Self {
        AdDetail {
            id: a.id,
            name: a.name.clone(),
            video_url: a.video_url.clone(),
            target_url: a.target_url.clone(),
            active: a.active,
            created_at: a.created_at,
            updated_at: a.updated_at,
            version: a.version,
        }
    }
}

/// Body of `POST /ads` and `PUT /ads/{id}`. Read like the tracking bodies (any JSON content type,
/// errors naming the field); fields it does not know are ignored, so that an ad read with `GET`
/// can be sent back with `PUT` as it is (`created_at`, `version`…).
#[derive(Debug, Object, Deserialize)]
#[oai(example, skip_serializing_if_is_none)]
pub struct AdInput {
    /// For `POST`: the id to create the ad with (a new one when absent). For `PUT`: must be the
    /// path's id when given.
    #[oai(nullable)]
    #[serde(default, deserialize_with = "super::tracking::uuid")]
    pub id: Option<Uuid>,
    /// 1 to 200 characters.
    pub name: String,
    /// The creative: an http(s) URL or a path starting with `/`.
    pub video_url: String,
    /// Where a click leads: an absolute http(s) URL (the click-through redirects only there).
    pub target_url: String,
    /// Whether players get the ad: on `POST`, true when absent; on `PUT`, unchanged when absent.
    #[oai(nullable)]
    #[serde(default)]
    pub active: Option<bool>,
}

impl poem_openapi::types::Example for AdInput {
    fn example() -> Self {
        AdInput {
            id: None,
            name: "Winter Sale".into(),
            video_url: "https://cdn.example.com/winter.mp4".into(),
            target_url: "https://shop.example.com/winter".into(),
            active: Some(true),
        }
    }
}

/// At most the first 100 characters of `text`, for an error that shows it.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(100) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// Checks an ad's fields, naming the first that is wrong.
fn validate(input: &AdInput) -> Result<(), ApiError> {
    let name = input.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::unprocessable(format!(
            "name must be 1 to 200 characters (leading and trailing spaces do not count), got {}",
            name.chars().count()
        )));
    }
    // A NUL or other control character in a name breaks the dashboards and CSV exports that
    // show it, and no ad needs one.
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(ApiError::unprocessable(format!(
            "name must not contain control characters, got {:?} in {:?}",
            c, input.name
        )));
    }
    if !is_http_url(&input.target_url) {
        return Err(ApiError::unprocessable(format!(
            "target_url must be an absolute http(s) URL with a host and no user name (the host in \
             ASCII, punycode for other letters; a port from 1 to 65535 if any), at most \
             {MAX_URL_LEN} characters, such as https://www.example.com/landing; got {:?}",
            shorten(&input.target_url)
        )));
    }
    // A path on the player's host; `//host/x` (and `/\host/x`, which browsers read alike) would
    // name another host.
    let video = &input.video_url;
    let path = video.starts_with('/')
        && !video.starts_with("//")
        && !video.starts_with("/\\")
        && video.len() <= MAX_URL_LEN
        && !video.chars().any(|c| c.is_whitespace() || c.is_control());
    if !(path || is_http_url(video)) {
        return Err(ApiError::unprocessable(format!(
            "video_url must be an http(s) URL with a host and no user name, or a path starting with a \
             single /, at most {MAX_URL_LEN} characters; got {:?}",
            shorten(video)
        )));
    }
    Ok(())
}

/// A version above `previous` that also orders writes of different instances by time: the
/// clock in microseconds, not the whole second the ad's `updated_at` shows (two writes to one ad
/// in the same second got one version, and which of them the catalog served was a coin toss).
fn next_version(previous: u64) -> u64 {
    next_version_at(previous, OffsetDateTime::now_utc())
}

/// [`next_version`] at `now`.
fn next_version_at(previous: u64, now: OffsetDateTime) -> u64 {
    let micros = u64::try_from(now.unix_timestamp_nanos() / 1000).unwrap_or(0);
    micros.max(previous.saturating_add(1))
}

/// Answer of `POST /ads`.
#[derive(Debug, ApiResponse)]
pub enum CreatedResponse {
    /// Created, with its version as `ETag`.
    #[oai(status = 201)]
    Created(Json<AdDetail>, #[oai(header = "Location")] String, #[oai(header = "ETag")] String),
}

/// Answer of `GET /ads/{id}`.
#[derive(Debug, ApiResponse)]
pub enum AdResponse {
    /// The ad, with its version as `ETag` (send it back in `If-Match` to change it safely).
    #[oai(status = 200)]
    Ok(Json<AdDetail>, #[oai(header = "ETag")] String),
}

/// Answer of `PUT /ads/{id}`.
#[derive(Debug, ApiResponse)]
pub enum UpdatedResponse {
    /// The ad as changed, with its new version as `ETag`.
    #[oai(status = 200)]
    Ok(Json<AdDetail>, #[oai(header = "ETag")] String),
    /// `If-Match` does not name the ad's current version: it changed since it was read, and
    /// nothing was changed now.
    #[oai(status = 412)]
    PreconditionFailed(Json<ErrorBody>),
}

/// Answer of `DELETE /ads/{id}`.
#[derive(Debug, ApiResponse)]
pub enum RetiredResponse {
    /// Retired (or already inactive).
    #[oai(status = 204)]
    Retired,
    /// `If-Match` does not name the ad's current version: it changed since it was read, and
    /// nothing was changed now.
    #[oai(status = 412)]
    PreconditionFailed(Json<ErrorBody>),
}

/// An ad's version as an entity tag: `"1763769600000000"`.
fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

/// Whether `If-Match` lets a change of an ad at `version` go ahead: when absent, or when it is
/// `*` or lists the ad's entity tag (compared strongly: a weak `W/` tag never matches).
fn if_match_allows(if_match: Option<&str>, version: u64) -> bool {
    let Some(if_match) = if_match else { return true };
    let current = etag(version);
    if_match.split(',').map(str::trim).any(|tag| tag == "*" || tag == current)
}

/// The 412 body for a change whose `If-Match` names another version than the ad's.
fn changed_since(id: Uuid, version: u64) -> Json<ErrorBody> {
    Json(ErrorBody {
        error: format!(
            "If-Match does not name the current version of ad {id}, which is at ETag {} now: it \
             changed since it was read; GET it again and apply the change to that",
            etag(version)
        ),
    })
}

/// A path segment documented as a UUID (`format: uuid`, so that clients and generated tests know
/// what to send) but taken as it comes: the handler parses it, so that a wrong one gets this
/// API's own 400 wording (see [`parse_id`]) rather than poem's.
#[derive(Debug)]
pub struct UuidText(pub String);

impl poem_openapi::types::Type for UuidText {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> std::borrow::Cow<'static, str> {
        Uuid::name()
    }

    fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
        Uuid::schema_ref()
    }

    fn as_raw_value(&self) -> Option<&Self> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
        Box::new(std::iter::once(self))
    }
}

impl poem_openapi::types::ParseFromParameter for UuidText {
    fn parse_from_parameter(value: &str) -> poem_openapi::types::ParseResult<Self> {
        Ok(Self(value.to_string()))
    }
}

fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(text).map_err(|_| {
        ApiError::bad_request(format!(
            "the ad id must be a UUID such as 11111111-1111-1111-1111-111111111111, got {text:?}"
        ))
    })
}

/// Catalog operations.
pub struct AdsApi {
    /// Shared service state.
    pub state: Arc<State>,
}

#[OpenApi(tag = "ApiTags::Ads")]
impl AdsApi {
    /// List active ads.
    ///
    /// Every active ad with the fields a player needs. Served from memory, at most two seconds old.
    #[oai(path = "/ads", method = "get", operation_id = "listAds")]
    async fn list(&self) -> Result<ListAdsResponse, ApiError> {
        let ads =
            self.state.catalog.active().await.map_err(|e| ApiError::storage(e, self.state.retry_after))?;
        Ok(ListAdsResponse::Ok(Json(ads.iter().map(AdSummary::from).collect())))
    }

    /// Create an ad.
    ///
    /// Needs the admin scope when API keys are configured. 201 with the ad and its Location; 409
    /// when the id is taken; 422 naming the field that is wrong.
    #[oai(path = "/ads", method = "post", operation_id = "createAd", transform = "admin_first")]
    async fn create(&self, auth: Credentials, body: JsonBody<AdInput>) -> Result<CreatedResponse, ApiError> {
        self.state.api_keys.require(&auth, Scope::Admin)?;
        validate(&body.0)?;
        let id = body.0.id.unwrap_or_else(Uuid::new_v4);
        let (_lock, found) = self.find(id).await?;
        if found.is_some() {
            return Err(ApiError::conflict(format!("ad {id} exists already; change it with PUT /ads/{id}")));
        }
        let now =
            OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| OffsetDateTime::now_utc());
        let ad = Ad {
            id,
            name: body.0.name.trim().to_string(),
            video_url: body.0.video_url,
            target_url: body.0.target_url,
            active: body.0.active.unwrap_or(true),
            created_at: now,
            updated_at: now,
            version: next_version(0),
        };
        self.save(&ad).await?;
        Ok(CreatedResponse::Created(Json(AdDetail::from(&ad)), format!("/ads/{id}"), etag(ad.version)))
    }

    /// Get an ad.
    ///
    /// Any ad, active or retired. Needs the read scope when API keys are configured.
    #[oai(path = "/ads/:id", method = "get", operation_id = "getAd", transform = "read_first")]
    async fn get(&self, auth: Credentials, id: Path<UuidText>) -> Result<AdResponse, ApiError> {
        self.state.api_keys.require(&auth, Scope::Read)?;
        let id = parse_id(&id.0.0)?;
        // Read under the ad's lock too (released at once): a change through this instance in
        // progress is answered once written.
        let (_, ad) = self.find(id).await?;
        let ad = ad.ok_or_else(|| ApiError::not_found(format!("ad {id} not found")))?;
        Ok(AdResponse::Ok(Json(AdDetail::from(ad.as_ref())), etag(ad.version)))
    }

    /// Change an ad.
    ///
    /// Replaces name, video_url, target_url and active (unchanged when absent: a retired ad stays
    /// retired unless `active` is true). Needs the admin scope
    /// when API keys are configured. 404 for an unknown id; 422 naming the field that is wrong.
    /// With `If-Match` (the `ETag` that `GET` gave), the change is made only if nobody changed
    /// the ad since: else 412, and nothing changes.
    #[oai(path = "/ads/:id", method = "put", operation_id = "updateAd", transform = "admin_first")]
    async fn update(
        &self,
        auth: Credentials,
        id: Path<UuidText>,
        /// The ad's `ETag` as read (or `*`): change it only if it is still at that version.
        #[oai(name = "If-Match")]
        if_match: Header<Option<String>>,
        body: JsonBody<AdInput>,
    ) -> Result<UpdatedResponse, ApiError> {
        self.state.api_keys.require(&auth, Scope::Admin)?;
        let id = parse_id(&id.0.0)?;
        if body.0.id.is_some_and(|b| b != id) {
            return Err(ApiError::unprocessable("id in the body differs from the id in the path"));
        }
        validate(&body.0)?;
        let (_lock, old) = self.find(id).await?;
        let old = old.ok_or_else(|| ApiError::not_found(format!("ad {id} not found")))?;
        if !if_match_allows(if_match.0.as_deref(), old.version) {
            return Ok(UpdatedResponse::PreconditionFailed(changed_since(id, old.version)));
        }
        let now =
            OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| OffsetDateTime::now_utc());
        let ad = Ad {
            id,
            name: body.0.name.trim().to_string(),
            video_url: body.0.video_url,
            target_url: body.0.target_url,
            // Absent: as it was. A PUT that fixes a typo must not bring a retired ad back.
            active: body.0.active.unwrap_or(old.active),
            created_at: old.created_at,
            updated_at: now,
            version: next_version(old.version),
        };
        self.save(&ad).await?;
        Ok(UpdatedResponse::Ok(Json(AdDetail::from(&ad)), etag(ad.version)))
    }

    /// Retire an ad.
    ///
    /// Soft: the ad becomes inactive and leaves `GET /ads`; its events and analytics stay, and
    /// PUT can bring it back. Needs the admin scope when API keys are configured. 404 for an
    /// unknown id. With `If-Match`, as for `PUT`: 412 when the ad changed since it was read.
    #[oai(path = "/ads/:id", method = "delete", operation_id = "retireAd", transform = "admin_first")]
    async fn retire(
        &self,
        auth: Credentials,
        id: Path<UuidText>,
        /// The ad's `ETag` as read (or `*`): retire it only if it is still at that version.
        #[oai(name = "If-Match")]
        if_match: Header<Option<String>>,
    ) -> Result<RetiredResponse, ApiError> {
        self.state.api_keys.require(&auth, Scope::Admin)?;
        let id = parse_id(&id.0.0)?;
        let (_lock, old) = self.find(id).await?;
        let old = old.ok_or_else(|| ApiError::not_found(format!("ad {id} not found")))?;
        if !if_match_allows(if_match.0.as_deref(), old.version) {
            return Ok(RetiredResponse::PreconditionFailed(changed_since(id, old.version)));
        }
        if old.active {
            let now =
                OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| OffsetDateTime::now_utc());
            let ad =
                Ad { active: false, updated_at: now, version: next_version(old.version), ..(*old).clone() };
            self.save(&ad).await?;
        }
        Ok(RetiredResponse::Retired)
    }
}

impl AdsApi {
    /// The ad as ClickHouse holds it now (the catalog's writes must not act on a cached copy
    /// that another instance has changed since), with its lock, to hold until the write.
    async fn find(&self, id: Uuid) -> Result<(WriteLock, Option<Arc<Ad>>), ApiError> {
        self.state.catalog.get_for_write(id).await.map_err(|e| ApiError::storage(e, self.state.retry_after))
    }

    async fn save(&self, ad: &Ad) -> Result<(), ApiError> {
        self.state
            .catalog
            .put(std::slice::from_ref(ad))
            .await
            .map_err(|e| ApiError::storage(e, self.state.retry_after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, video: &str, target: &str) -> AdInput {
        AdInput {
            id: None,
            name: name.into(),
            video_url: video.into(),
            target_url: target.into(),
            active: None,
        }
    }

    #[test]
    fn ads_are_validated_field_by_field() {
        assert!(validate(&input("Sale", "/v/sale.mp4", "https://shop.example/sale")).is_ok());
        assert!(validate(&input("Sale", "https://cdn.example/s.mp4", "http://shop.example")).is_ok());
        for (bad, field) in [
            (input("", "/v.mp4", "https://a.example"), "name"),
            (input("a\0b", "/v.mp4", "https://a.example"), "name"),
            (input("A", "/v\0.mp4", "https://a.example"), "video_url"),
            (input("A", "/v.mp4", "https://a.example/\0"), "target_url"),
            (input(&"x".repeat(201), "/v.mp4", "https://a.example"), "name"),
            (input("A", "/v.mp4", "javascript:alert(1)"), "target_url"),
            (input("A", "/v.mp4", "/relative"), "target_url"),
            (input("A", "v.mp4", "https://a.example"), "video_url"),
        ] {
            match validate(&bad) {
                Err(ApiError::Unprocessable(b)) => assert!(b.0.error.starts_with(field), "{}", b.0.error),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn versions_grow() {
        let now = OffsetDateTime::now_utc();
        assert!(next_version_at(0, now) > 1_700_000_000_000_000);
        assert_eq!(next_version_at(u64::MAX - 1, now), u64::MAX);
        assert_eq!(next_version_at(u64::MAX, now), u64::MAX);
        // Two writes in one second: their versions differ by the microseconds between them.
        let second = time::macros::datetime!(2026-11-23 01:00:00 UTC);
        let (a, b) = (second + time::Duration::microseconds(10), second + time::Duration::microseconds(11));
        assert_eq!(next_version_at(0, b), next_version_at(0, a) + 1);
    }
}
