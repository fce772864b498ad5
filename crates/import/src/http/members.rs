//! Image members: `GET/POST /v2/images/{id}/members` and
//! `GET/PUT/DELETE /v2/images/{id}/members/{member}`, shaped as Glance's
//! `image_members` resource (create answers 200, not 201, as Glance does). The rules
//! are [`crate::service::Service::add_member`] and its siblings.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;

use super::auth::Auth;
use super::{blocking, empty, AppState, JsonBody};
use crate::db::Member;
use crate::error::{Error, Result};

/// A member as Glance shows it.
#[derive(Serialize)]
pub struct MemberView<'a> {
    member_id: &'a str,
    image_id: &'a str,
    status: &'a str,
    created_at: &'a str,
    updated_at: &'a str,
    schema: &'static str,
}

impl<'a> MemberView<'a> {
    /// The view of `m`.
    pub fn of(m: &'a Member) -> MemberView<'a> {
        MemberView {
            member_id: &m.member,
            image_id: &m.image_id,
            status: &m.status,
            created_at: &m.created_at,
            updated_at: &m.updated_at,
            schema: "/v2/schemas/member",
        }
    }
}

#[derive(Serialize)]
struct MemberList<'a> {
    members: Vec<MemberView<'a>>,
    schema: &'static str,
}

/// The string `key` of a JSON object body, with Glance's answers when it is missing.
fn string_field(body: &Value, key: &str, missing: &str) -> Result<String> {
    let Some(obj) = body.as_object() else {
        return Err(Error::BadRequest(format!(
            "Expected an object in the form {{\"{key}\": \"…\"}}"
        )));
    };
    match obj.get(key) {
        None => Err(Error::BadRequest(missing.into())),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(Error::BadRequest(format!(
            "'{key}' must be a string, not {other}"
        ))),
    }
}

async fn list(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<Response> {
    let svc = s.service.clone();
    let members = blocking(move || svc.list_members(&caller, &id)).await?;
    Ok(Json(MemberList {
        members: members.iter().map(MemberView::of).collect(),
        schema: "/v2/schemas/members",
    })
    .into_response())
}

async fn create(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response> {
    let member = string_field(&body, "member", "Member to be added not specified")?;
    let svc = s.service.clone();
    let m = blocking(move || svc.add_member(&caller, &id, &member)).await?;
    Ok(Json(MemberView::of(&m)).into_response())
}

async fn show(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path((id, member)): Path<(String, String)>,
) -> Result<Response> {
    let svc = s.service.clone();
    let m = blocking(move || svc.get_member(&caller, &id, &member)).await?;
    Ok(Json(MemberView::of(&m)).into_response())
}

async fn update(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path((id, member)): Path<(String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response> {
    let status = string_field(&body, "status", "Status not specified")?;
    let svc = s.service.clone();
    let m = blocking(move || svc.update_member(&caller, &id, &member, &status)).await?;
    Ok(Json(MemberView::of(&m)).into_response())
}

async fn delete(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path((id, member)): Path<(String, String)>,
) -> Result<Response> {
    let svc = s.service.clone();
    blocking(move || svc.remove_member(&caller, &id, &member)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// The routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/images/{id}/members", get(list).post(create))
        .route(
            "/v2/images/{id}/members/{member}",
            get(show).put(update).delete(delete),
        )
}
