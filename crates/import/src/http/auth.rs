//! The caller, as an extractor: `X-Auth-Token` (Glance's clients) or
//! `Authorization: Bearer`. A static token is looked up in constant time; with
//! `[keystone]` the token is validated by Keystone (cached), off the async runtime.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::{blocking, AppState, RequestId};
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
            .filter(|t| !t.is_empty())
            .ok_or(Error::Unauthorized)?;
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .map_or_else(String::new, |r| r.0.clone());
        let service = state.service.clone();
        if service.uses_keystone() {
            let token = token.to_string();
            blocking(move || service.authenticate(&token, &request_id))
                .await
                .map(Auth)
        } else {
            service.authenticate(token, &request_id).map(Auth)
        }
    }
}
