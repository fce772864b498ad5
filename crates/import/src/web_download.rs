//! The `web-download` import method: the service fetches the image from a URL into
//! the workspace, streaming, under the operator's filter of schemes, hosts and ports
//! (Glance's `[import_filtering_opts]`), checked again at every redirect.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use vconvert_engine::CancelToken;

use crate::config::UriFilter;

/// Redirects followed at most (each one filtered like the first URL).
const MAX_REDIRECTS: usize = 5;

fn allowed<T: PartialEq>(allow: &[T], deny: &[T], v: &T) -> bool {
    if allow.is_empty() {
        !deny.contains(v)
    } else {
        allow.contains(v)
    }
}

/// Parses `uri` and checks it against `filter`; the error says what was refused.
pub fn check_uri(filter: &UriFilter, uri: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(uri).map_err(|e| format!("URI '{uri}' is not a valid URL: {e}"))?;
    let scheme = url.scheme().to_ascii_lowercase();
    if !allowed(&filter.allowed_schemes, &filter.disallowed_schemes, &scheme) {
        return Err(format!(
            "URI for web-download does not pass filtering: scheme '{scheme}' is not allowed"
        ));
    }
    let host = url
        .host_str()
        .ok_or_else(|| format!("URI '{uri}' has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if !allowed(&filter.allowed_hosts, &filter.disallowed_hosts, &host) {
        return Err(format!(
            "URI for web-download does not pass filtering: host '{host}' is not allowed"
        ));
    }
    let port = url
        .port_or_known_default()
        .ok_or_else(|| format!("URI '{uri}' has no port and its scheme has no default"))?;
    if !allowed(&filter.allowed_ports, &filter.disallowed_ports, &port) {
        return Err(format!(
            "URI for web-download does not pass filtering: port {port} is not allowed"
        ));
    }
    Ok(url)
}

/// Downloads `uri` into `path` (created), at most `cap` bytes, calling `hold` with
/// every chunk's length before writing it (false: the workspace is full). On error
/// the partial file is removed.
pub fn fetch(
    filter: &UriFilter,
    uri: &str,
    path: &Path,
    cap: u64,
    hold: &dyn Fn(u64) -> bool,
    cancel: &CancelToken,
) -> Result<(), String> {
    let result = fetch_inner(filter, uri, path, cap, hold, cancel);
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn fetch_inner(
    filter: &UriFilter,
    uri: &str,
    path: &Path,
    cap: u64,
    hold: &dyn Fn(u64) -> bool,
    cancel: &CancelToken,
) -> Result<(), String> {
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .build();
    let mut url = check_uri(filter, uri)?;
    let mut redirects = 0;
    let response = loop {
        let resp = match agent.request_url("GET", &url).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, _)) => {
                return Err(format!("web-download of {url} failed: HTTP {code}"))
            }
            Err(e) => return Err(format!("web-download of {url} failed: {e}")),
        };
        if (300..400).contains(&resp.status()) {
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                return Err(format!(
                    "web-download of {uri}: more than {MAX_REDIRECTS} redirects"
                ));
            }
            let location = resp
                .header("Location")
                .ok_or_else(|| format!("web-download of {url}: redirect without Location"))?;
            let next = url
                .join(location)
                .map_err(|e| format!("web-download of {url}: bad redirect '{location}': {e}"))?;
            url = check_uri(filter, next.as_str())?;
            continue;
        }
        break resp;
    };
    if let Some(len) = response
        .header("Content-Length")
        .and_then(|l| l.parse::<u64>().ok())
    {
        if len > cap {
            return Err(format!(
                "web-download of {url}: {len} bytes exceed image_size_cap ({cap} bytes)"
            ));
        }
    }
    let mut body = response.into_reader();
    let mut f = std::fs::File::create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        if cancel.is_cancelled() {
            return Err("cancelled".into());
        }
        let n = body
            .read(&mut buf)
            .map_err(|e| format!("web-download of {url} interrupted after {total} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > cap {
            return Err(format!(
                "web-download of {url}: more than image_size_cap ({cap} bytes)"
            ));
        }
        if !hold(n as u64) {
            return Err(format!(
                "web-download of {url}: workspace full after {total} bytes; try again later"
            ));
        }
        f.write_all(&buf[..n])
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    f.sync_all()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter() -> UriFilter {
        UriFilter {
            allowed_schemes: vec!["http".into(), "https".into()],
            disallowed_schemes: vec![],
            allowed_hosts: vec![],
            disallowed_hosts: vec!["169.254.169.254".into()],
            allowed_ports: vec![80, 443],
            disallowed_ports: vec![],
        }
    }

    #[test]
    fn filtering_as_glance() {
        let f = filter();
        assert!(check_uri(&f, "http://example.com/a.qcow2").is_ok());
        assert!(check_uri(&f, "https://example.com:443/a").is_ok());
        let e = check_uri(&f, "file:///etc/passwd").unwrap_err();
        assert!(e.contains("scheme 'file'"), "{e}");
        let e = check_uri(&f, "http://169.254.169.254/latest").unwrap_err();
        assert!(e.contains("host"), "{e}");
        let e = check_uri(&f, "http://example.com:8080/a").unwrap_err();
        assert!(e.contains("port 8080"), "{e}");
        let open = UriFilter {
            allowed_ports: vec![],
            disallowed_ports: vec![22],
            ..f
        };
        assert!(check_uri(&open, "http://example.com:8080/a").is_ok());
        assert!(check_uri(&open, "http://example.com:22/a").is_err());
        assert!(check_uri(&open, "not a url").is_err());
    }
}
