//! Ad catalog endpoints: `GET /ads`, the old services' list of active ads.

use std::sync::Arc;

use poem_openapi::{ApiResponse, Object, OpenApi, payload::Json};

use super::{ApiTags, State, error::ApiError};
use crate::domain::Ad;

/// An active ad as players see it (field names as the old service had them).
#[derive(Debug, Object)]
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
}
