//! The HTTP API: Glance's Image API v2 on axum (tokio, hyper).
//!
//! One router per resource ([`versions`], [`schemas`], [`images`], [`members`],
//! [`image_data`], [`import`], [`tasks`]) merged in [`router`] over one [`AppState`]. Every response
//! carries `x-openstack-request-id: req-<uuid>` and is logged on one line to stderr
//! ([`request_id`]). Handlers parse the request, call the [`Service`] off the async
//! runtime ([`blocking`]) and shape its answer; errors are [`crate::error::Error`]s,
//! mapped to statuses in [`error::status_of`].

pub mod auth;
pub mod error;
pub mod image_data;
pub mod images;
pub mod import;
pub mod members;
pub mod schemas;
pub mod tasks;
pub mod versions;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::service::Service;

/// Largest JSON request body read.
pub const MAX_JSON_BODY: usize = 64 << 10;

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The service.
    pub service: Arc<Service>,
}

/// The id of the request being served (`req-<uuid>`), in its extensions.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Bytes of a streamed request body, for the request log (a response extension).
#[derive(Clone, Copy, Debug)]
pub struct BytesIn(pub u64);

/// Runs blocking service work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

/// A JSON request body of type `T` (at most [`MAX_JSON_BODY`] bytes), with 400/413
/// answers in our shape.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                Error::TooLarge(format!("JSON body larger than {MAX_JSON_BODY} bytes"))
            } else {
                Error::BadRequest(format!("cannot read request body: {e}"))
            }
        })?;
        if bytes.is_empty() {
            return Err(Error::BadRequest("Body expected in request.".into()));
        }
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            Error::BadRequest(format!("request body is not valid JSON for this call: {e}"))
        })
    }
}

/// Parses a query string into its pairs, in order (keys may repeat).
pub fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// Gives the request its id, answers it in `x-openstack-request-id`, turns internal
/// errors into a fixed message naming the id (the cause goes to the log), and logs
/// one line: method, path, status, bytes, duration, request id.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = format!("req-{}", uuid::Uuid::new_v4());
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let bytes_in = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let start = Instant::now();
    let mut res = next.run(req).await;
    if let Some(cause) = res.extensions_mut().remove::<error::InternalCause>() {
        tracing::error!(request_id = %id, %method, %path, cause = %cause.0, "internal error");
        res = error::error_body(
            res.status(),
            format!("The server could not complete request {id}; the operator can find it in the log by this id."),
        );
    }
    let bytes_in = res.extensions().get::<BytesIn>().map_or(bytes_in, |b| b.0);
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-openstack-request-id", v);
    }
    let bytes_out = res
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| axum::body::HttpBody::size_hint(res.body()).exact())
        .unwrap_or(0);
    tracing::info!(
        target: "vimport::request",
        "{method} {path} {} in={bytes_in} out={bytes_out} {:.1}ms {id}",
        res.status().as_u16(),
        start.elapsed().as_secs_f64() * 1000.0
    );
    res
}

async fn not_found(req: Request) -> Error {
    Error::NotFound(format!(
        "no such endpoint: {} {}",
        req.method(),
        req.uri().path()
    ))
}

/// The whole API. Metadata calls are bounded by `request_timeout` and
/// [`MAX_JSON_BODY`]; data transfers (stage, upload, download) by neither.
pub fn router(service: Arc<Service>) -> Router {
    let timeout = Duration::from_secs(service.config.request_timeout);
    let state = AppState { service };
    let metadata = Router::new()
        .merge(versions::router())
        .merge(schemas::router())
        .merge(images::router())
        .merge(members::router())
        .merge(import::router())
        .merge(tasks::router())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            timeout,
        ));
    // With Keystone, a 401 names it as keystonemiddleware does.
    let www_authenticate = state
        .service
        .config
        .keystone
        .as_ref()
        .and_then(|k| HeaderValue::from_str(&format!("Keystone uri=\"{}\"", k.auth_url)).ok());
    let router = Router::new()
        .merge(metadata)
        .merge(image_data::router())
        .fallback(not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn(request_id));
    match www_authenticate {
        Some(v) => router.layer(axum::middleware::map_response(move |mut res: Response| {
            let v = v.clone();
            async move {
                if res.headers().contains_key(header::WWW_AUTHENTICATE) {
                    res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                res
            }
        })),
        None => router,
    }
}

/// An empty response with `status`.
pub fn empty(status: axum::http::StatusCode) -> Response {
    (status, Body::empty()).into_response()
}

/// Serves `listener` until `shutdown` resolves, then stops accepting and lets
/// requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<Service>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(service))
        .with_graceful_shutdown(shutdown)
        .await
}
