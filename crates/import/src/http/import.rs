//! `POST /v2/images/{id}/import` and `GET /v2/info/import`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::Auth;
use super::images::IMPORT_METHODS;
use super::{blocking, empty, AppState, JsonBody};
use crate::error::{Error, Result};
use crate::service::ImportMethod;

#[derive(Deserialize, Serialize)]
struct Method {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uri: Option<String>,
}

/// The body of `POST /v2/images/{id}/import`.
#[derive(Deserialize, Serialize)]
struct ImportRequest {
    method: Method,
    /// Multi-store fields Glance accepts; vimport has one store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stores: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    all_stores: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    all_stores_must_succeed: Option<bool>,
}

async fn import(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ImportRequest>,
) -> Result<Response> {
    let method = match (body.method.name.as_str(), &body.method.uri) {
        ("glance-direct", _) => ImportMethod::GlanceDirect,
        ("web-download", Some(uri)) => ImportMethod::WebDownload { uri: uri.clone() },
        ("web-download", None) => {
            return Err(Error::BadRequest(
                "web-download needs the URI to fetch: {\"method\": {\"name\": \"web-download\", \"uri\": \"…\"}}".into(),
            ))
        }
        (other, _) => {
            return Err(Error::BadRequest(format!(
                "Import method '{other}' is not valid; enabled methods: {}",
                IMPORT_METHODS.join(", ")
            )))
        }
    };
    let request = serde_json::to_value(&body).map_err(Error::internal)?;
    let svc = s.service.clone();
    blocking(move || svc.import(&caller, &id, method, request)).await?;
    Ok(empty(StatusCode::ACCEPTED))
}

#[derive(Serialize)]
struct ImportInfo {
    #[serde(rename = "import-methods")]
    import_methods: Discovery,
}

#[derive(Serialize)]
struct Discovery {
    description: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    value: &'static [&'static str],
}

async fn info(_: Auth) -> Json<ImportInfo> {
    Json(ImportInfo {
        import_methods: Discovery {
            description: "Import methods available.",
            kind: "array",
            value: IMPORT_METHODS,
        },
    })
}

/// The routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/images/{id}/import", post(import))
        .route("/v2/info/import", get(info))
}
