//! [`Error`] as an HTTP response: the status mapping in one function, Glance-shaped
//! JSON bodies, `WWW-Authenticate` on 401, and internal causes kept out of the body
//! (the request-id middleware logs them and answers a fixed message).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::error::Error;

/// The cause of a 500, for the log only (see [`super::request_id`]).
#[derive(Clone, Debug)]
pub struct InternalCause(pub String);

/// The status of each error.
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::BadRequest(_) => StatusCode::BAD_REQUEST,
        Error::Unauthorized => StatusCode::UNAUTHORIZED,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Error::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: u16,
    title: &'a str,
    message: String,
}

/// The JSON body of an error answer (keystonemiddleware's shape). The message starts
/// with the status line, as Glance's own (webob) error pages do, so glanceclient prints
/// `HTTP 404 Not Found: …` as it does against Glance.
pub fn error_body(status: StatusCode, message: String) -> Response {
    let title = status.canonical_reason().unwrap_or("");
    let body = ErrorBody {
        error: ErrorDetail {
            code: status.as_u16(),
            title,
            message: format!("{} {title}: {message}", status.as_u16()),
        },
    };
    (status, Json(body)).into_response()
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = status_of(&self);
        match self {
            Error::Internal(cause) => {
                // The middleware replaces the body with one naming the request id.
                let mut r = error_body(status, "internal error".into());
                r.extensions_mut().insert(InternalCause(cause));
                r
            }
            Error::Unauthorized => {
                let mut r = error_body(status, self.to_string());
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Keystone uri=\"local\", X-Auth-Token"),
                );
                r
            }
            Error::RangeNotSatisfiable { size } => {
                let mut r = error_body(status, self.to_string());
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                r
            }
            other => error_body(status, other.to_string()),
        }
    }
}
