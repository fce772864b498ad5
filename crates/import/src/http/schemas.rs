//! `GET /v2/schemas/{image,images,member,members,task,tasks}`: the JSON schemas glanceclient builds
//! its commands from and validates responses against (Glance's
//! `images.get_schema`, `image_members.get_schema`, `tasks.get_task_schema` and their collections). Extra image
//! properties are allowed as strings.

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Auth;
use super::AppState;
use crate::config::{GLANCE_CONTAINER_FORMATS, GLANCE_DISK_FORMATS};

const UUID_PATTERN: &str =
    "^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){12}$";

fn nullable_enum(values: &[&str]) -> Value {
    let mut v = vec![Value::Null];
    v.extend(values.iter().map(|s| Value::String(s.to_string())));
    Value::Array(v)
}

/// The image schema.
pub fn image_schema() -> Value {
    json!({
        "name": "image",
        "properties": {
            "id": {"type": "string", "description": "An identifier for the image", "pattern": UUID_PATTERN},
            "name": {"type": ["null", "string"], "description": "Descriptive name for the image", "maxLength": 255},
            "status": {"type": "string", "readOnly": true, "description": "Status of the image",
                "enum": ["queued", "saving", "active", "killed", "deleted", "uploading", "importing", "pending_delete", "deactivated"]},
            "visibility": {"type": "string", "description": "Scope of image accessibility",
                "enum": ["community", "public", "private", "shared"]},
            "protected": {"type": "boolean", "description": "If true, image will not be deletable."},
            "os_hidden": {"type": "boolean", "description": "If true, image will not appear in default image list response."},
            "checksum": {"type": ["null", "string"], "readOnly": true, "description": "md5 hash of image contents.", "maxLength": 32},
            "os_hash_algo": {"type": ["null", "string"], "readOnly": true, "description": "Algorithm to calculate the os_hash_value", "maxLength": 64},
            "os_hash_value": {"type": ["null", "string"], "readOnly": true, "description": "Hexdigest of the image contents using the algorithm specified by the os_hash_algo", "maxLength": 128},
            "owner": {"type": ["null", "string"], "description": "Owner of the image", "maxLength": 255},
            "size": {"type": ["null", "integer"], "readOnly": true, "description": "Size of image file in bytes"},
            "virtual_size": {"type": ["null", "integer"], "readOnly": true, "description": "Virtual size of image in bytes"},
            "container_format": {"type": ["null", "string"], "description": "Format of the container", "enum": nullable_enum(GLANCE_CONTAINER_FORMATS)},
            "disk_format": {"type": ["null", "string"], "description": "Format of the disk", "enum": nullable_enum(GLANCE_DISK_FORMATS)},
            "created_at": {"type": "string", "readOnly": true, "description": "Date and time of image registration"},
            "updated_at": {"type": "string", "readOnly": true, "description": "Date and time of the last image modification"},
            "tags": {"type": "array", "description": "List of strings related to the image", "items": {"type": "string", "maxLength": 255}},
            "direct_url": {"type": "string", "readOnly": true, "description": "URL to access the image file kept in external store"},
            "min_ram": {"type": "integer", "description": "Amount of ram (in MB) required to boot image."},
            "min_disk": {"type": "integer", "description": "Amount of disk space (in GB) required to boot image."},
            "self": {"type": "string", "readOnly": true, "description": "An image self url"},
            "file": {"type": "string", "readOnly": true, "description": "An image file url"},
            "stores": {"type": "string", "readOnly": true, "description": "Store in which image data resides."},
            "schema": {"type": "string", "readOnly": true, "description": "An image schema url"},
            "locations": {"type": "array", "items": {"type": "object", "properties": {
                "url": {"type": "string", "maxLength": 255}, "metadata": {"type": "object"}},
                "required": ["url", "metadata"]},
                "description": "A set of URLs to access the image file kept in external store"}
        },
        "additionalProperties": {"type": "string"},
        "links": [
            {"rel": "self", "href": "{self}"},
            {"rel": "enclosure", "href": "{file}"},
            {"rel": "describedby", "href": "{schema}"}
        ]
    })
}

/// The member schema (Glance's `image_members.get_schema`).
pub fn member_schema() -> Value {
    json!({
        "name": "member",
        "properties": {
            "member_id": {"type": "string", "description": "An identifier for the image member (tenantId)"},
            "image_id": {"type": "string", "description": "An identifier for the image", "pattern": UUID_PATTERN},
            "created_at": {"type": "string", "description": "Date and time of image member creation"},
            "updated_at": {"type": "string", "description": "Date and time of last modification of image member"},
            "status": {"type": "string", "description": "The status of this image member",
                "enum": crate::service::MEMBER_STATUSES},
            "schema": {"type": "string", "readOnly": true}
        }
    })
}

fn task_properties(full: bool) -> Value {
    let mut p = json!({
        "id": {"description": "An identifier for the task", "pattern": UUID_PATTERN, "type": "string"},
        "type": {"description": "The type of task represented by this content",
            "enum": ["import", "api_image_import", "location_import"], "type": "string"},
        "status": {"description": "The current status of this task",
            "enum": ["pending", "processing", "success", "failure"], "type": "string"},
        "owner": {"description": "An identifier for the owner of this task", "type": "string"},
        "image_id": {"description": "Image associated with the task", "type": "string"},
        "request_id": {"description": "Human-readable informative request-id", "type": "string"},
        "user_id": {"description": "User associated with the task", "type": "string"},
        "expires_at": {"description": "Datetime when this resource would be subject to removal", "type": ["null", "string"]},
        "created_at": {"description": "Datetime when this resource was created", "type": "string"},
        "updated_at": {"description": "Datetime when this resource was updated", "type": "string"},
        "self": {"readOnly": true, "type": "string"},
        "schema": {"readOnly": true, "type": "string"}
    });
    if full {
        p["input"] = json!({"description": "The parameters required by task, JSON blob", "type": ["null", "object"]});
        p["result"] = json!({"description": "The result of current task, JSON blob", "type": ["null", "object"]});
        p["message"] = json!({"description": "Human-readable informative message only included when appropriate (usually on failure)", "type": "string"});
    }
    p
}

/// The task schema.
pub fn task_schema() -> Value {
    json!({"name": "task", "properties": task_properties(true), "additionalProperties": false})
}

fn collection(name: &str, item: Value) -> Value {
    json!({
        "name": name,
        "properties": {
            name: {"type": "array", "items": item},
            "first": {"type": "string"},
            "next": {"type": "string"},
            "schema": {"type": "string"}
        },
        "links": [
            {"rel": "first", "href": "{first}"},
            {"rel": "next", "href": "{next}"},
            {"rel": "describedby", "href": "{schema}"}
        ]
    })
}

async fn image(_: Auth) -> Json<Value> {
    Json(image_schema())
}

async fn images(_: Auth) -> Json<Value> {
    Json(collection("images", image_schema()))
}

async fn member(_: Auth) -> Json<Value> {
    Json(member_schema())
}

async fn members(_: Auth) -> Json<Value> {
    Json(collection("members", member_schema()))
}

async fn task(_: Auth) -> Json<Value> {
    Json(task_schema())
}

async fn tasks(_: Auth) -> Json<Value> {
    Json(collection(
        "tasks",
        json!({"name": "task", "properties": task_properties(false), "additionalProperties": false}),
    ))
}

/// The routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/schemas/image", get(image))
        .route("/v2/schemas/images", get(images))
        .route("/v2/schemas/member", get(member))
        .route("/v2/schemas/members", get(members))
        .route("/v2/schemas/task", get(task))
        .route("/v2/schemas/tasks", get(tasks))
}
