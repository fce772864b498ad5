//! The caller, as an extractor: `X-Auth-Token` (Glance's clients) or
//! `Authorization: Bearer`, looked up in constant time.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::{AppState, RequestId};
use crate::error::Error;
use crate::service::Caller;

/// The authenticated caller of a request.
pub struct Auth(pub Caller);

impl FromRequestParts<AppState> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let token = parts
            .headers
            .get("x-auth-token")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .or_else(|| {
                parts
                    .headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim)
            })
            .ok_or(Error::Unauthorized)?;
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .map_or_else(String::new, |r| r.0.clone());
        state
            .service
            .authenticate(token, &request_id)
            .map(Auth)
            .ok_or(Error::Unauthorized)
    }
}
