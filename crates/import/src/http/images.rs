//! Image records: create, show, list, update (JSON patch), tags, delete.

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::Auth;
use super::{blocking, empty, query_pairs, AppState, JsonBody};
use crate::db::Image;
use crate::error::{Error, Result};
use crate::service::{NewImage, PatchOp};

/// The import methods vimport offers (`OpenStack-image-import-methods`).
pub const IMPORT_METHODS: &[&str] = &["glance-direct", "web-download"];

/// The body of `POST /v2/images`.
#[derive(Deserialize)]
pub struct CreateImage {
    id: Option<String>,
    name: Option<String>,
    visibility: Option<String>,
    protected: Option<bool>,
    os_hidden: Option<bool>,
    owner: Option<String>,
    min_disk: Option<u64>,
    min_ram: Option<u64>,
    disk_format: Option<String>,
    container_format: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(flatten)]
    extra: BTreeMap<String, Value>,
}

/// An image as Glance shows it: base attributes (null when unset, as the schema
/// allows), extra properties as strings, links.
#[derive(Serialize)]
pub struct ImageView<'a> {
    #[serde(flatten)]
    properties: &'a BTreeMap<String, String>,
    id: &'a str,
    name: &'a Option<String>,
    status: &'a str,
    visibility: &'a str,
    protected: bool,
    os_hidden: bool,
    owner: &'a Option<String>,
    min_disk: u64,
    min_ram: u64,
    disk_format: &'a Option<String>,
    container_format: &'a Option<String>,
    size: Option<u64>,
    virtual_size: Option<u64>,
    checksum: &'a Option<String>,
    os_hash_algo: &'a Option<String>,
    os_hash_value: &'a Option<String>,
    tags: &'a [String],
    created_at: &'a str,
    updated_at: &'a str,
    #[serde(rename = "self")]
    self_: String,
    file: String,
    schema: &'static str,
    /// The import lock: set while an import runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    os_glance_import_task: Option<&'a str>,
}

impl<'a> ImageView<'a> {
    /// The view of `i`.
    pub fn of(i: &'a Image) -> ImageView<'a> {
        ImageView {
            properties: &i.properties,
            id: &i.id,
            name: &i.name,
            status: &i.status,
            visibility: &i.visibility,
            protected: i.protected,
            os_hidden: i.os_hidden,
            owner: &i.owner,
            min_disk: i.min_disk,
            min_ram: i.min_ram,
            disk_format: &i.disk_format,
            container_format: &i.container_format,
            size: i.size,
            virtual_size: i.virtual_size,
            checksum: &i.checksum,
            os_hash_algo: &i.os_hash_algo,
            os_hash_value: &i.os_hash_value,
            tags: &i.tags,
            created_at: &i.created_at,
            updated_at: &i.updated_at,
            self_: format!("/v2/images/{}", i.id),
            file: format!("/v2/images/{}/file", i.id),
            schema: "/v2/schemas/image",
            os_glance_import_task: i.task_id.as_deref().filter(|_| i.status == "importing"),
        }
    }
}

#[derive(Serialize)]
struct ImageList<'a> {
    images: Vec<ImageView<'a>>,
    first: String,
    schema: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

async fn create(
    State(s): State<AppState>,
    Auth(caller): Auth,
    JsonBody(body): JsonBody<CreateImage>,
) -> Result<Response> {
    let new = NewImage {
        id: body.id,
        name: body.name,
        visibility: body.visibility,
        protected: body.protected,
        os_hidden: body.os_hidden,
        owner: body.owner,
        min_disk: body.min_disk,
        min_ram: body.min_ram,
        disk_format: body.disk_format,
        container_format: body.container_format,
        tags: body.tags,
        extra: body.extra,
    };
    let svc = s.service.clone();
    let img = blocking(move || svc.create_image(&caller, new)).await?;
    let mut res = (StatusCode::CREATED, Json(ImageView::of(&img))).into_response();
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/images/{}", img.id)) {
        h.insert(header::LOCATION, v);
    }
    h.insert(
        "OpenStack-image-import-methods",
        HeaderValue::from_static("glance-direct,web-download"),
    );
    Ok(res)
}

async fn show(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<Response> {
    let svc = s.service.clone();
    let img = blocking(move || svc.get_image(&caller, &id)).await?;
    Ok(Json(ImageView::of(&img)).into_response())
}

/// `path?query` without `marker`, and the next page's link.
pub fn paging_links(
    path: &str,
    params: &[(String, String)],
    next_marker: Option<&str>,
) -> (String, Option<String>) {
    let kept: Vec<&(String, String)> = params.iter().filter(|(k, _)| k != "marker").collect();
    let encode = |pairs: &[&(String, String)], marker: Option<&str>| {
        let mut e = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            e.append_pair(k, v);
        }
        if let Some(m) = marker {
            e.append_pair("marker", m);
        }
        e.finish()
    };
    let q = encode(&kept, None);
    let first = if q.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{q}")
    };
    let next = next_marker.map(|m| format!("{path}?{}", encode(&kept, Some(m))));
    (first, next)
}

async fn list(
    State(s): State<AppState>,
    Auth(caller): Auth,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    let params = query_pairs(q.as_deref());
    let svc = s.service.clone();
    let p = params.clone();
    let page = blocking(move || svc.list_images(&caller, &p)).await?;
    let (first, next) = paging_links("/v2/images", &params, page.next_marker.as_deref());
    Ok(Json(ImageList {
        images: page.items.iter().map(ImageView::of).collect(),
        first,
        schema: "/v2/schemas/images",
        next,
    })
    .into_response())
}

/// The media types of Glance's JSON patch.
const PATCH_TYPES: &[&str] = &[
    "application/openstack-images-v2.1-json-patch",
    "application/openstack-images-v2.0-json-patch",
];

async fn update(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(ops): JsonBody<Vec<PatchOp>>,
) -> Result<Response> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = ct.split(';').next().unwrap_or("").trim();
    if !PATCH_TYPES.contains(&media) {
        return Err(Error::UnsupportedMediaType(format!(
            "Content-Type '{ct}' is not supported for PATCH; use application/openstack-images-v2.1-json-patch"
        )));
    }
    let svc = s.service.clone();
    let img = blocking(move || svc.patch_image(&caller, &id, &ops)).await?;
    Ok(Json(ImageView::of(&img)).into_response())
}

async fn delete(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<Response> {
    let svc = s.service.clone();
    blocking(move || svc.delete_image(&caller, &id)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

async fn add_tag(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path((id, tag)): Path<(String, String)>,
) -> Result<Response> {
    let svc = s.service.clone();
    blocking(move || svc.add_tag(&caller, &id, &tag)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

async fn remove_tag(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path((id, tag)): Path<(String, String)>,
) -> Result<Response> {
    let svc = s.service.clone();
    blocking(move || svc.remove_tag(&caller, &id, &tag)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// The routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/images", get(list).post(create))
        .route("/v2/images/{id}", get(show).patch(update).delete(delete))
        .route(
            "/v2/images/{id}/tags/{tag}",
            put(add_tag).delete(remove_tag),
        )
}
