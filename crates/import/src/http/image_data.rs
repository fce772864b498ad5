//! Image data, streamed both ways with backpressure (never whole in memory):
//! `PUT /v2/images/{id}/stage`, `PUT /v2/images/{id}/file` (upload through the import
//! workflow) and `GET /v2/images/{id}/file` (with `Content-MD5` and `Range`).

use std::io::{Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::Router;
use futures_util::StreamExt;

use super::auth::Auth;
use super::{blocking, empty, AppState};
use crate::error::{Error, Result};
use crate::staging::{drain, Pieces, WRITE_BATCH};
use crate::store::StoredData;
use vconvert_core::IoBuffer;

/// An empty 204 telling the request log how many bytes were received.
fn received(n: &AtomicU64) -> Response {
    let mut r = empty(StatusCode::NO_CONTENT);
    r.extensions_mut()
        .insert(super::BytesIn(n.load(Ordering::Relaxed)));
    r
}

/// Full pieces ([`WRITE_BATCH`] bytes) of a request body queued ahead of the blocking
/// thread that writes them, so hyper goes on reading the socket meanwhile.
const BODY_QUEUE: usize = 3;

/// A request body's pieces for a blocking thread ([`Pieces`]), gathered into
/// [`WRITE_BATCH`]-byte buffers by a task that reads the body on the runtime (copying
/// each of hyper's pieces at once, so hyper reuses its read buffer); the buffers come
/// back once written. Counts the bytes received.
struct BodyPieces {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<IoBuffer>>,
    spare: Arc<std::sync::Mutex<Vec<IoBuffer>>>,
    n: Arc<AtomicU64>,
}

impl Pieces for BodyPieces {
    fn next_piece(&mut self) -> std::io::Result<Option<IoBuffer>> {
        match self.rx.blocking_recv() {
            None => Ok(None),
            Some(Ok(b)) => {
                self.n.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Some(b))
            }
            Some(Err(e)) => Err(e),
        }
    }

    fn recycle(&mut self, buf: IoBuffer) {
        if let Ok(mut spare) = self.spare.lock() {
            spare.push(buf);
        }
    }
}

/// The request body as pieces for a blocking thread, its declared length, and the
/// count of bytes received.
fn body_pieces(headers: &HeaderMap, body: Body) -> (BodyPieces, Option<u64>, Arc<AtomicU64>) {
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (tx, rx) = tokio::sync::mpsc::channel(BODY_QUEUE);
    let spare = Arc::new(std::sync::Mutex::new(Vec::<IoBuffer>::new()));
    let buffers = spare.clone();
    // Page-aligned buffers: written directly, or copied into the page cache five times
    // faster than from a `Vec` (see `IoBuffer`).
    let fresh = move || {
        let mut b = buffers
            .lock()
            .ok()
            .and_then(|mut s| s.pop())
            .unwrap_or_default();
        b.resize(WRITE_BATCH);
        b
    };
    let mut stream = body.into_data_stream();
    // Ends with the body, or when the blocking side stops taking pieces.
    tokio::spawn(async move {
        let mut buf = fresh();
        let mut filled = 0;
        while let Some(piece) = stream.next().await {
            let mut piece: &[u8] = match &piece {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            while !piece.is_empty() {
                let take = piece.len().min(WRITE_BATCH - filled);
                buf[filled..filled + take].copy_from_slice(&piece[..take]);
                filled += take;
                piece = &piece[take..];
                if filled == WRITE_BATCH {
                    let full = std::mem::replace(&mut buf, fresh());
                    filled = 0;
                    if tx.send(Ok(full)).await.is_err() {
                        return;
                    }
                }
            }
        }
        if filled > 0 {
            buf.truncate(filled);
            let _ = tx.send(Ok(buf)).await;
        }
    });
    let n = Arc::new(AtomicU64::new(0));
    (
        BodyPieces {
            rx,
            spare,
            n: n.clone(),
        },
        len,
        n,
    )
}

/// Bytes of a refused upload read and discarded before answering, so the client
/// (which sends before it reads) sees the answer rather than a broken pipe; past
/// this the connection is closed.
const DRAIN_MAX: u64 = 64 << 20;

/// Refuses at once an upload whose announced size (`x-openstack-image-size`, which
/// glanceclient sends with its chunked uploads) exceeds `image_size_cap`.
fn check_announced_size(s: &AppState, headers: &HeaderMap) -> Result<()> {
    let cap = s.service.config.image_size_cap;
    match headers
        .get("x-openstack-image-size")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(n) if n > cap => Err(Error::TooLarge(format!(
            "the upload of {n} bytes exceeds image_size_cap ({cap} bytes)"
        ))),
        _ => Ok(()),
    }
}

async fn stage(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let (mut body, len, count) = body_pieces(&headers, body);
    let svc = s.service.clone();
    let announced = check_announced_size(&s, &headers);
    blocking(move || {
        let r = announced.and_then(|_| svc.stage(&caller, &id, &mut body, len));
        if r.is_err() {
            drain(&mut body, DRAIN_MAX);
        }
        r
    })
    .await?;
    Ok(received(&count))
}

async fn upload(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let (mut body, len, count) = body_pieces(&headers, body);
    let svc = s.service.clone();
    let announced = check_announced_size(&s, &headers);
    blocking(move || {
        let r = announced.and_then(|_| svc.upload(&caller, &id, &mut body, len));
        if r.is_err() {
            drain(&mut body, DRAIN_MAX);
        }
        r
    })
    .await?;
    Ok(received(&count))
}

/// A single `bytes=` range of an entity of `size` bytes, as (first, last) inclusive.
/// `Ok(None)`: no usable Range (serve everything).
fn parse_range(v: &str, size: u64) -> Result<Option<(u64, u64)>> {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Several ranges: served whole, as RFC 9110 allows.
        return Ok(None);
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or(Error::RangeNotSatisfiable { size })?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| Error::RangeNotSatisfiable { size })?;
        if n == 0 || size == 0 {
            return Err(Error::RangeNotSatisfiable { size });
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let first: u64 = a.parse().map_err(|_| Error::RangeNotSatisfiable { size })?;
        let last = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| Error::RangeNotSatisfiable { size })?
                .min(size.saturating_sub(1))
        };
        if first >= size || last < first {
            return Err(Error::RangeNotSatisfiable { size });
        }
        (first, last)
    };
    Ok(Some(range))
}

async fn download(
    State(s): State<AppState>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    let svc = s.service.clone();
    let range_header = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let found = blocking(move || svc.image_data(&caller, &id)).await?;
    let Some((mut data, size, checksum)) = found else {
        return Ok(empty(StatusCode::NO_CONTENT));
    };
    let range = match &range_header {
        Some(r) => parse_range(r, size)?,
        None => None,
    };
    let (status, start, len) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        None => (StatusCode::OK, 0, size),
    };
    let data = blocking(move || {
        data.seek(SeekFrom::Start(start)).map_err(Error::internal)?;
        Ok(data)
    })
    .await?;
    let mut res = (status, Body::from_stream(read_stream(data, len))).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    } else if let Some(md5) = checksum.and_then(|c| HeaderValue::from_str(&c).ok()) {
        // Glance sends the stored checksum (hex MD5) for the whole file only.
        h.insert("content-md5", md5);
    }
    Ok(res)
}

/// Bytes read per blocking read of a download.
const DOWNLOAD_PIECE: u64 = 1 << 20;

/// The next `len` bytes of `data` (a file, an RBD image: blocking reads, each on the
/// blocking pool) as a body stream; data that ends early is an error (the client sees
/// a truncated body, never a short one that looks complete).
fn read_stream(
    data: Box<dyn StoredData>,
    len: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold((Some(data), len), |(data, left)| async move {
        let mut data = data?;
        if left == 0 {
            return None;
        }
        let want = left.min(DOWNLOAD_PIECE) as usize;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; want];
            let n = data.read(&mut buf)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((data, buf))
        })
        .await;
        let end = (None, 0);
        Some(match read {
            Ok(Ok((_, buf))) if buf.is_empty() => (
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the stored data ended early",
                )),
                end,
            ),
            Ok(Ok((data, buf))) => {
                let n = buf.len() as u64;
                (Ok(Bytes::from(buf)), (Some(data), left - n))
            }
            Ok(Err(e)) => (Err(e), end),
            Err(e) => (Err(std::io::Error::other(e)), end),
        })
    })
}

/// The routes (no request timeout, no JSON body limit).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v2/images/{id}/stage", put(stage))
        .route("/v2/images/{id}/file", put(upload).get(download))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100).unwrap(), Some((50, 99)));
        assert_eq!(parse_range("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(parse_range("items=0-1", 100).unwrap(), None);
        for bad in ["bytes=100-", "bytes=5-2", "bytes=x-1", "bytes=-0"] {
            assert!(
                matches!(
                    parse_range(bad, 100),
                    Err(Error::RangeNotSatisfiable { size: 100 })
                ),
                "{bad}"
            );
        }
    }
}
