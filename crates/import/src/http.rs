//! The HTTP API (JSON, Glance's v2 paths) over tiny_http, with bearer-token auth.

use std::io::Read;
use std::sync::Arc;

use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

use crate::service::{ApiError, ApiResult, Service};

/// Largest JSON request body read.
const MAX_JSON_BODY: u64 = 64 << 10;

fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn respond_json(req: Request, status: u16, body: &Value) {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec_pretty(body).unwrap_or_default()
    };
    let mut r = Response::from_data(bytes).with_status_code(StatusCode(status));
    if let Some(h) = header("Content-Type", "application/json").filter(|_| !body.is_null()) {
        r.add_header(h);
    }
    let _ = req.respond(r);
}

fn respond_error(req: Request, e: &ApiError) {
    let body = json!({"error": {"code": e.status, "message": e.message}});
    respond_json(req, e.status, &body);
}

fn read_json_body(req: &mut Request) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    req.as_reader()
        .take(MAX_JSON_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError {
            status: 400,
            message: format!("cannot read request body: {e}"),
        })?;
    if body.len() as u64 > MAX_JSON_BODY {
        return Err(ApiError {
            status: 413,
            message: format!("JSON body larger than {MAX_JSON_BODY} bytes"),
        });
    }
    Ok(body)
}

fn authorized(service: &Service, req: &Request) -> bool {
    let want = format!("Bearer {}", service.token);
    req.headers()
        .iter()
        .any(|h| h.field.equiv("Authorization") && h.value.as_str() == want)
}

/// Handles one request.
pub fn handle(service: &Arc<Service>, mut req: Request) {
    if !authorized(service, &req) {
        let e = ApiError {
            status: 401,
            message: "missing or wrong bearer token: send 'Authorization: Bearer <token>'".into(),
        };
        return respond_error(req, &e);
    }
    let path = req
        .url()
        .split('?')
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_string();
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    let result: ApiResult = match (&method, parts.as_slice()) {
        (Method::Get, ["v2", "info", "import"]) => service.import_info(),
        (Method::Post, ["v2", "images"]) => {
            read_json_body(&mut req).and_then(|b| service.create_image(&b))
        }
        (Method::Get, ["v2", "images"]) => service.list_images(),
        (Method::Get, ["v2", "images", id]) => service.get_image(id),
        (Method::Delete, ["v2", "images", id]) => service.delete_image(id),
        (Method::Put, ["v2", "images", id, "stage"]) => {
            let len = req.body_length().map(|l| l as u64);
            let id = id.to_string();
            service.stage(&id, req.as_reader(), len)
        }
        (Method::Post, ["v2", "images", id, "import"]) => {
            let id = id.to_string();
            read_json_body(&mut req).and_then(|b| service.import(&id, &b))
        }
        (Method::Get, ["v2", "images", id, "file"]) => match service.image_file(id) {
            Ok(Some((file, len))) => {
                let r = Response::new(
                    StatusCode(200),
                    header("Content-Type", "application/octet-stream")
                        .into_iter()
                        .collect(),
                    file,
                    Some(len as usize),
                    None,
                );
                let _ = req.respond(r);
                return;
            }
            Ok(None) => Ok((204, Value::Null)),
            Err(e) => Err(e),
        },
        (Method::Get, ["v2", "tasks", id]) => service.get_task(id),
        (_, ["v2", ..]) => Err(ApiError {
            status: 404,
            message: format!("no such endpoint: {method} {path}"),
        }),
        _ => Err(ApiError {
            status: 404,
            message: format!("no such endpoint: {method} {path}; the API lives under /v2"),
        }),
    };
    match result {
        Ok((status, body)) => respond_json(req, status, &body),
        Err(e) => respond_error(req, &e),
    }
}

/// Serves requests on `threads` handler threads until the server is dropped.
pub fn serve(service: Arc<Service>, server: Arc<Server>, threads: usize) {
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let (service, server) = (service.clone(), server.clone());
        handles.push(std::thread::spawn(move || {
            while let Ok(req) = server.recv() {
                handle(&service, req);
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
}
