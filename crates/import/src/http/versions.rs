//! Version discovery, without auth: `GET /` (300 Multiple Choices) and `GET /versions`
//! (200), listing the v2 versions whose API vimport serves, as Glance lists them.

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::AppState;

/// The v2 minor versions served: 2.12 (`GET /v2/images/{id}/tasks`; glanceclient
/// asks for exactly this id before calling it), 2.7 (os_hidden, multihash) and
/// before. Not 2.8–2.11 (multiple stores), 2.13+ (cache, locations).
const VERSIONS: &[(&str, &str)] = &[
    ("v2.12", "CURRENT"),
    ("v2.7", "SUPPORTED"),
    ("v2.6", "SUPPORTED"),
    ("v2.5", "SUPPORTED"),
    ("v2.4", "SUPPORTED"),
    ("v2.3", "SUPPORTED"),
    ("v2.2", "SUPPORTED"),
    ("v2.1", "SUPPORTED"),
    ("v2.0", "SUPPORTED"),
];

#[derive(Serialize)]
struct Link {
    rel: &'static str,
    href: String,
}

#[derive(Serialize)]
struct Version {
    id: &'static str,
    status: &'static str,
    links: Vec<Link>,
}

#[derive(Serialize)]
struct Versions {
    versions: Vec<Version>,
}

fn versions(headers: &HeaderMap) -> Json<Versions> {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let href = format!("http://{host}/v2/");
    Json(Versions {
        versions: VERSIONS
            .iter()
            .map(|(id, status)| Version {
                id,
                status,
                links: vec![Link {
                    rel: "self",
                    href: href.clone(),
                }],
            })
            .collect(),
    })
}

async fn root(headers: HeaderMap) -> impl IntoResponse {
    (StatusCode::MULTIPLE_CHOICES, versions(&headers))
}

async fn list(headers: HeaderMap) -> impl IntoResponse {
    versions(&headers)
}

/// The routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(root))
        .route("/versions", get(list))
        .route("/v2", get(list))
        .route("/v2/", get(list))
}
