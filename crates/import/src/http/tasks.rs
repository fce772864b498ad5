//! Tasks: `GET /v2/tasks`, `GET /v2/tasks/{id}`, `GET /v2/images/{id}/tasks`, in
//! Glance's shape.

use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;

use super::auth::Auth;
use super::images::paging_links;
use super::{blocking, query_pairs, AppState};
use crate::db::Task;
use crate::error::Result;

/// A task as Glance shows it; `full` adds input, result and message (the list shows
/// stubs without them).
#[derive(Serialize)]
pub struct TaskView<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    status: &'a str,
    owner: &'a str,
    created_at: &'a str,
    updated_at: &'a str,
    #[serde(rename = "self")]
    self_: String,
    schema: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
}

impl<'a> TaskView<'a> {
    /// The view of `t`.
    pub fn of(t: &'a Task, full: bool) -> TaskView<'a> {
        let json = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
        TaskView {
            id: &t.id,
            kind: &t.kind,
            status: &t.status,
            owner: t.owner.as_deref().unwrap_or(""),
            created_at: &t.created_at,
            updated_at: &t.updated_at,
            self_: format!("/v2/tasks/{}", t.id),
            schema: "/v2/schemas/task",
            expires_at: t.expires_at.as_deref(),
            input: full.then(|| json(&t.input)),
            result: full.then(|| t.result.as_deref().map_or(Value::Null, json)),
            message: full.then_some(t.message.as_str()),
            image_id: full.then_some(t.image_id.as_str()),
            request_id: t.request_id.as_deref().filter(|_| full),
            user_id: t.user_id.as_deref().filter(|_| full),
        }
    }
}

#[derive(Serialize)]
struct TaskList<'a> {
    tasks: Vec<TaskView<'a>>,
    first: String,
    schema: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

#[derive(Serialize)]
struct ImageTasks<'a> {
    tasks: Vec<TaskView<'a>>,
}

async fn show(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<Response> {
    let svc = s.service.clone();
    let t = blocking(move || svc.get_task(&caller, &id)).await?;
    Ok(Json(TaskView::of(&t, true)).into_response())
}

async fn list(
    State(s): State<AppState>,
    Auth(caller): Auth,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    let params = query_pairs(q.as_deref());
    let svc = s.service.clone();
    let p = params.clone();
    let page = blocking(move || svc.list_tasks(&caller, &p)).await?;
    let (first, next) = paging_links("/v2/tasks", &params, page.next_marker.as_deref());
    Ok(Json(TaskList {
        tasks: page.items.iter().map(|t| TaskView::of(t, false)).collect(),
        first,
        schema: "/v2/schemas/tasks",
        next,
    })
    .into_response())
}

async fn of_image(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<Response> {
    let svc = s.service.clone();
    let tasks = blocking(move || svc.image_tasks(&caller, &id)).await?;
    Ok(Json(ImageTasks {
        tasks: tasks.iter().map(|t| TaskView::of(t, true)).collect(),
    })
    .into_response())
}

/// The routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/tasks", get(list))
        .route("/v2/tasks/{id}", get(show))
        .route("/v2/images/{id}/tasks", get(of_image))
}
