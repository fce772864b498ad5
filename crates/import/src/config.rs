//! `vimport.toml` and its `VIMPORT_<KEY>` environment overrides.
//!
//! Every key can be set in the file or by an environment variable named `VIMPORT_` and
//! the key in upper case (the variable wins). Sizes take qemu-style suffixes (`1T`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vconvert_core::{parse_size, Format};

/// Keys the configuration knows, for error messages.
pub const KEYS: &[&str] = &[
    "data_dir",
    "output_format",
    "vmdk_allowed_types",
    "image_size_cap",
    "max_workers",
    "convert_threads",
    "workspace_dir",
    "workspace_bytes",
    "store_dir",
    "store",
    "rbd_pool",
    "rbd_user",
    "ceph_conf",
    "rbd_chunk_size",
    "rbd_snapshot",
    "database",
    "host_id",
    "task_lease",
    "listen",
    "token",
    "tokens",
    "convert_rate_limit",
    "shutdown_grace",
    "request_timeout",
    "web_download_allowed_schemes",
    "web_download_disallowed_schemes",
    "web_download_allowed_hosts",
    "web_download_disallowed_hosts",
    "web_download_allowed_ports",
    "web_download_disallowed_ports",
    "keystone_auth_url",
    "keystone_username",
    "keystone_password",
    "keystone_user_domain_name",
    "keystone_project_name",
    "keystone_project_domain_name",
    "keystone_application_credential_id",
    "keystone_application_credential_secret",
    "keystone_cache_seconds",
    "keystone_cache_size",
    "keystone_timeout",
];

/// Most `convert_threads` accepted (a typo such as `40000` would start that many
/// threads per step).
pub const MAX_CONVERT_THREADS: usize = 1024;

/// A token clients may send, and who it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenEntry {
    /// The secret (`X-Auth-Token` or `Authorization: Bearer`).
    pub token: String,
    /// The project it acts for (images' `owner`).
    pub project_id: String,
    /// Sees and edits every project's images.
    pub admin: bool,
}

/// `[keystone]`: validate tokens with Keystone instead of the static `token`/`tokens`.
/// In the file a table (`[keystone]` then `auth_url = …`); in the environment
/// `VIMPORT_KEYSTONE_AUTH_URL` and so on.
#[derive(Clone, PartialEq, Eq)]
pub struct KeystoneConfig {
    /// Keystone's public URL (`http://keystone:5000`, with or without `/v3`).
    pub auth_url: String,
    /// vimport's own credentials (it needs the `service` role to validate tokens).
    pub auth: KeystoneAuth,
    /// Seconds an answer about a token is reused (keystonemiddleware's
    /// `token_cache_time`, default 300): a revoked token is refused at the latest this
    /// long after its revocation.
    pub cache_seconds: u64,
    /// Most answers cached (default 10000).
    pub cache_size: usize,
    /// Seconds a call to Keystone may take (default 10).
    pub timeout: u64,
}

impl std::fmt::Debug for KeystoneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeystoneConfig")
            .field("auth_url", &self.auth_url)
            .field("auth", &self.auth)
            .field("cache_seconds", &self.cache_seconds)
            .field("cache_size", &self.cache_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// How vimport itself logs in to Keystone.
#[derive(Clone, PartialEq, Eq)]
pub enum KeystoneAuth {
    /// A service user, its token scoped to a project.
    Password {
        /// User name.
        username: String,
        /// Password.
        password: String,
        /// The user's domain (default `Default`).
        user_domain_name: String,
        /// The project to scope to (usually `service`).
        project_name: String,
        /// The project's domain (default `Default`).
        project_domain_name: String,
    },
    /// An application credential (its own scope and roles).
    ApplicationCredential {
        /// The credential's id.
        id: String,
        /// Its secret.
        secret: String,
    },
}

impl std::fmt::Debug for KeystoneAuth {
    /// Secrets are not printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeystoneAuth::Password {
                username,
                project_name,
                ..
            } => write!(
                f,
                "Password {{ username: {username:?}, project_name: {project_name:?}, .. }}"
            ),
            KeystoneAuth::ApplicationCredential { id, .. } => {
                write!(f, "ApplicationCredential {{ id: {id:?}, .. }}")
            }
        }
    }
}

/// The project of the single `token` key (an admin token).
pub const ADMIN_PROJECT: &str = "admin";

/// What `web-download` may fetch, as Glance's `[import_filtering_opts]`: a non-empty
/// allow-list admits only what it names; otherwise the deny-list refuses what it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UriFilter {
    /// Schemes allowed (default http, https).
    pub allowed_schemes: Vec<String>,
    /// Schemes refused when `allowed_schemes` is empty.
    pub disallowed_schemes: Vec<String>,
    /// Hosts allowed (default: any).
    pub allowed_hosts: Vec<String>,
    /// Hosts refused when `allowed_hosts` is empty.
    pub disallowed_hosts: Vec<String>,
    /// Ports allowed (default 80, 443).
    pub allowed_ports: Vec<u16>,
    /// Ports refused when `allowed_ports` is empty.
    pub disallowed_ports: Vec<u16>,
}

/// The service's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Base directory of the defaults below.
    pub data_dir: PathBuf,
    /// Format images are stored in.
    pub output_format: Format,
    /// VMDK create types accepted from uploads.
    pub vmdk_allowed_types: Vec<String>,
    /// Largest upload accepted, in bytes.
    pub image_size_cap: u64,
    /// Conversions that may run at once.
    pub max_workers: usize,
    /// Worker threads the running conversions share (beyond each one's reading and
    /// placing threads): one import alone uses them all, two share them (default:
    /// every core).
    pub convert_threads: usize,
    /// Staging and conversion space.
    pub workspace_dir: PathBuf,
    /// Bytes the workspace may hold (staged uploads plus reserved conversion outputs).
    pub workspace_bytes: u64,
    /// Where stored images live (the `fs` store).
    pub store_dir: PathBuf,
    /// Which store keeps active images (`store`: `fs`, the default, or `rbd`).
    pub store: StoreKind,
    /// The `rbd` store's settings.
    pub rbd: RbdConfig,
    /// The catalogue: a SQLite file (one host), or `postgres://…` shared by hosts.
    pub database: crate::db::Location,
    /// This host's name in the catalogue (tasks it holds, uploads it staged); must
    /// be unique among hosts sharing a database and stable across restarts.
    pub host_id: String,
    /// Seconds a host holds a task without renewing its lease (it renews every
    /// third of it); after that another host fails the task.
    pub task_lease: u64,
    /// Address to listen on.
    pub listen: String,
    /// The single admin token (`token`); `None` and no `tokens` means "generate one
    /// at start".
    pub token: Option<String>,
    /// Tokens with their project (`tokens = ["secret:project[:admin]", …]`).
    pub tokens: Vec<TokenEntry>,
    /// Bytes per second a conversion may process (`None`: no limit).
    pub convert_rate_limit: Option<u64>,
    /// Seconds running conversions may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace: u64,
    /// Seconds a metadata request may take (uploads and downloads are not limited).
    pub request_timeout: u64,
    /// What `web-download` may fetch.
    pub web_download: UriFilter,
    /// Keystone validates tokens (`None`: the static `token`/`tokens`).
    pub keystone: Option<KeystoneConfig>,
}

/// Which store keeps active images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// One file per image in `store_dir` (the default).
    Fs,
    /// One RBD image per image in a Ceph pool, as Glance's rbd driver (needs vimport
    /// built with the cargo feature `rbd`).
    Rbd,
}

/// The `rbd` store's settings (Glance's `rbd_store_*` options).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdConfig {
    /// The pool (`rbd_pool`, default `images`).
    pub pool: String,
    /// The Ceph user, without `client.` (`rbd_user`; default: librados' `admin`).
    pub user: Option<String>,
    /// The Ceph configuration file, which names the monitors and the keyring
    /// (`ceph_conf`; default: `$CEPH_CONF`, then `/etc/ceph/ceph.conf`).
    pub ceph_conf: Option<PathBuf>,
    /// The RBD object size of new images and the unit of their writes
    /// (`rbd_chunk_size`, a power of two from 4 KiB to 32 MiB; default 8 MiB, as
    /// Glance's `rbd_store_chunk_size`).
    pub chunk_size: u64,
    /// Whether each image gets the protected snapshot `snap` that Nova and Cinder
    /// clone (`rbd_snapshot`, default true).
    pub snapshot: bool,
}

impl RbdConfig {
    /// The RBD object order (log2 of [`RbdConfig::chunk_size`]).
    pub fn order(&self) -> u8 {
        self.chunk_size.trailing_zeros() as u8
    }
}

/// A configuration error: names the key (and where it came from) and what is wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads `file` (if given, or `vimport.toml` in the current directory if it exists),
    /// then applies the environment `env`.
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut values: BTreeMap<String, (String, String)> = BTreeMap::new();
        let path = match file {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from("vimport.toml")).filter(|p| p.exists()),
        };
        if let Some(path) = path {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
            let table: toml::Table = text
                .parse()
                .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            // A table (`[keystone]`) gives keys prefixed with its name.
            let mut flat = Vec::new();
            for (k, v) in table {
                match v {
                    toml::Value::Table(t) => {
                        flat.extend(t.into_iter().map(|(sub, v)| (format!("{k}_{sub}"), v)))
                    }
                    v => flat.push((k, v)),
                }
            }
            for (k, v) in flat {
                let s = match v {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Array(a) => a
                        .iter()
                        .map(|x| {
                            x.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| x.to_string())
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                values.insert(k, (s, path.display().to_string()));
            }
        }
        for (k, v) in env {
            // Fail points are read by `failpoint::init`, not configuration.
            if k == crate::failpoint::ENV {
                continue;
            }
            if let Some(key) = k.strip_prefix("VIMPORT_") {
                values.insert(key.to_ascii_lowercase(), (v.clone(), k.clone()));
            }
        }
        if let Some(unknown) = values.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(ConfigError(format!(
                "unknown configuration key '{unknown}' (from {}); valid keys: {}",
                values[unknown].1,
                KEYS.join(", ")
            )));
        }
        let get = |k: &str| values.get(k).map(|(v, src)| (v.clone(), src.clone()));
        let bad = |k: &str, src: &str, why: String| ConfigError(format!("{k} (from {src}): {why}"));
        let size = |k: &str, default: u64| -> Result<u64, ConfigError> {
            match get(k) {
                None => Ok(default),
                Some((v, src)) => parse_size(&v).map_err(|e| bad(k, &src, e.to_string())),
            }
        };
        let data_dir = PathBuf::from(get("data_dir").map_or("vimport-data".into(), |v| v.0));
        let path_or = |k: &str, default: PathBuf| get(k).map_or(default, |v| PathBuf::from(v.0));
        let output_format = match get("output_format") {
            None => Format::Raw,
            Some((v, src)) => parse_disk_format(&v).map_err(|e| bad("output_format", &src, e))?,
        };
        let max_workers = match get("max_workers") {
            None => 2,
            Some((v, src)) => match v.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(bad(
                        "max_workers",
                        &src,
                        format!("'{v}' is not a number of at least 1"),
                    ))
                }
            },
        };
        let convert_threads = match get("convert_threads") {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some((v, src)) => match v.parse::<usize>() {
                Ok(n) if n <= MAX_CONVERT_THREADS => n,
                _ => {
                    return Err(bad(
                        "convert_threads",
                        &src,
                        format!("'{v}' is not a number of threads from 0 to {MAX_CONVERT_THREADS}"),
                    ))
                }
            },
        };
        let workspace_bytes = size("workspace_bytes", 64 << 30)?;
        if workspace_bytes == 0 {
            return Err(ConfigError("workspace_bytes must be more than 0".into()));
        }
        let list = |k: &str, default: &[&str]| -> Vec<String> {
            match get(k) {
                None => default.iter().map(|s| s.to_string()).collect(),
                Some((v, _)) => v
                    .split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect(),
            }
        };
        let ports = |k: &str, default: &[&str]| -> Result<Vec<u16>, ConfigError> {
            list(k, default)
                .iter()
                .map(|p| {
                    p.parse::<u16>().map_err(|_| {
                        let src = get(k).map_or_else(|| "default".into(), |v| v.1);
                        bad(k, &src, format!("'{p}' is not a port number"))
                    })
                })
                .collect()
        };
        let seconds = |k: &str, default: u64| -> Result<u64, ConfigError> {
            match get(k) {
                None => Ok(default),
                Some((v, src)) => v
                    .parse::<u64>()
                    .map_err(|_| bad(k, &src, format!("'{v}' is not a number of seconds"))),
            }
        };
        let mut tokens = Vec::new();
        if let Some((v, src)) = get("tokens") {
            for entry in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let parts: Vec<&str> = entry.split(':').collect();
                let admin = match parts.get(2) {
                    None => false,
                    Some(&"admin") => true,
                    Some(other) => {
                        return Err(bad(
                            "tokens",
                            &src,
                            format!("'{other}' after the project must be 'admin' (entries are token:project[:admin])"),
                        ))
                    }
                };
                match parts.as_slice() {
                    [t, p, ..] if !t.is_empty() && !p.is_empty() && parts.len() <= 3 => tokens
                        .push(TokenEntry {
                            token: t.to_string(),
                            project_id: p.to_string(),
                            admin,
                        }),
                    _ => {
                        return Err(bad(
                            "tokens",
                            &src,
                            "entries are token:project[:admin]".into(),
                        ))
                    }
                }
            }
        }
        let web_download = UriFilter {
            allowed_schemes: list("web_download_allowed_schemes", &["http", "https"]),
            disallowed_schemes: list("web_download_disallowed_schemes", &[]),
            allowed_hosts: list("web_download_allowed_hosts", &[]),
            disallowed_hosts: list("web_download_disallowed_hosts", &[]),
            allowed_ports: ports("web_download_allowed_ports", &["80", "443"])?,
            disallowed_ports: ports("web_download_disallowed_ports", &[])?,
        };
        let store = match get("store") {
            None => StoreKind::Fs,
            Some((v, src)) => match v.to_ascii_lowercase().as_str() {
                "fs" | "file" => StoreKind::Fs,
                "rbd" => StoreKind::Rbd,
                _ => return Err(bad("store", &src, format!("'{v}' is not fs or rbd"))),
            },
        };
        let rbd_chunk_size = size("rbd_chunk_size", 8 << 20)?;
        if !rbd_chunk_size.is_power_of_two() || !(4096..=32 << 20).contains(&rbd_chunk_size) {
            let src = get("rbd_chunk_size").map_or_else(String::new, |v| v.1);
            return Err(bad(
                "rbd_chunk_size",
                &src,
                format!("{rbd_chunk_size} is not a power of two from 4K to 32M"),
            ));
        }
        let rbd = RbdConfig {
            pool: get("rbd_pool")
                .map(|v| v.0)
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "images".into()),
            user: get("rbd_user")
                .map(|v| v.0)
                .filter(|u| !u.is_empty())
                .map(|u| u.strip_prefix("client.").unwrap_or(&u).to_string()),
            ceph_conf: get("ceph_conf")
                .filter(|v| !v.0.is_empty())
                .map(|v| PathBuf::from(v.0)),
            chunk_size: rbd_chunk_size,
            snapshot: match get("rbd_snapshot") {
                None => true,
                Some((v, src)) => match v.to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => true,
                    "false" | "0" | "no" | "off" => false,
                    _ => {
                        return Err(bad(
                            "rbd_snapshot",
                            &src,
                            format!("'{v}' is not true or false"),
                        ))
                    }
                },
            },
        };
        let keystone = keystone_config(&get)?;
        if keystone.is_some() {
            if let Some((_, src)) = get("token").or_else(|| get("tokens")) {
                return Err(ConfigError(format!(
                    "[keystone] is set, and so are static tokens (from {src}): with Keystone \
                     every token is validated by Keystone; remove token/tokens or [keystone]"
                )));
            }
        }
        Ok(Config {
            keystone,
            store,
            rbd,
            tokens,
            shutdown_grace: seconds("shutdown_grace", 30)?,
            request_timeout: seconds("request_timeout", 60)?.max(1),
            web_download,
            output_format,
            vmdk_allowed_types: get("vmdk_allowed_types").map_or_else(
                || {
                    vec![
                        "streamOptimized".to_string(),
                        "monolithicSparse".to_string(),
                    ]
                },
                |(v, _)| {
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                },
            ),
            image_size_cap: size("image_size_cap", 1 << 40)?,
            max_workers,
            convert_threads,
            workspace_dir: path_or("workspace_dir", data_dir.join("workspace")),
            workspace_bytes,
            store_dir: path_or("store_dir", data_dir.join("store")),
            database: get("database").map_or_else(
                || crate::db::Location::Sqlite(data_dir.join("vimport.db")),
                |v| crate::db::Location::parse(&v.0),
            ),
            host_id: match get("host_id") {
                Some((v, _)) if !v.trim().is_empty() => v.trim().to_string(),
                _ => default_host_id(&path_or("workspace_dir", data_dir.join("workspace"))),
            },
            task_lease: match get("task_lease") {
                None => 30,
                Some((v, src)) => match v.parse::<u64>() {
                    Ok(n) if n >= 3 => n,
                    _ => {
                        return Err(bad(
                            "task_lease",
                            &src,
                            format!("'{v}' is not a number of seconds of at least 3"),
                        ))
                    }
                },
            },
            listen: get("listen").map_or("127.0.0.1:9292".into(), |v| v.0),
            token: get("token").map(|v| v.0).filter(|t| !t.is_empty()),
            convert_rate_limit: match get("convert_rate_limit") {
                None => None,
                Some((v, src)) => Some(
                    parse_size(&v).map_err(|e| bad("convert_rate_limit", &src, e.to_string()))?,
                ),
            },
            data_dir,
        })
    }
}

/// `[keystone]` from the `keystone_*` keys: `None` without `auth_url`.
fn keystone_config(
    get: &dyn Fn(&str) -> Option<(String, String)>,
) -> Result<Option<KeystoneConfig>, ConfigError> {
    let val = |k: &str| get(k).map(|v| v.0).filter(|v| !v.trim().is_empty());
    let Some(auth_url) = val("keystone_auth_url") else {
        if let Some(k) = KEYS
            .iter()
            .find(|k| k.starts_with("keystone_") && get(k).is_some())
        {
            return Err(ConfigError(format!(
                "keystone {} (from {}) is set but [keystone] auth_url is not",
                &k["keystone_".len()..],
                get(k).map(|v| v.1).unwrap_or_default()
            )));
        }
        return Ok(None);
    };
    let src = get("keystone_auth_url").map(|v| v.1).unwrap_or_default();
    let bad = |why: String| ConfigError(format!("[keystone] (from {src}): {why}"));
    match url::Url::parse(auth_url.trim()) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
        _ => {
            return Err(bad(format!(
                "auth_url '{auth_url}' is not an http:// or https:// URL"
            )))
        }
    }
    let auth = match (
        val("keystone_application_credential_id"),
        val("keystone_username"),
    ) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "set either username/password or application_credential_id/secret, not both".into(),
            ))
        }
        (Some(id), None) => KeystoneAuth::ApplicationCredential {
            id,
            secret: val("keystone_application_credential_secret")
                .ok_or_else(|| bad("application_credential_secret is missing".into()))?,
        },
        (None, Some(username)) => KeystoneAuth::Password {
            username,
            password: val("keystone_password").ok_or_else(|| bad("password is missing".into()))?,
            user_domain_name: val("keystone_user_domain_name").unwrap_or_else(|| "Default".into()),
            project_name: val("keystone_project_name").ok_or_else(|| {
                bad("project_name is missing (the service user's project, e.g. service)".into())
            })?,
            project_domain_name: val("keystone_project_domain_name")
                .unwrap_or_else(|| "Default".into()),
        },
        (None, None) => {
            return Err(bad(
                "vimport's own credentials are missing: set username, password and \
                 project_name (a user with the service role), or application_credential_id \
                 and application_credential_secret"
                    .into(),
            ))
        }
    };
    let number = |k: &str, default: u64, min: u64| -> Result<u64, ConfigError> {
        match val(k) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(bad(format!(
                    "{} '{v}' is not a number of at least {min}",
                    &k["keystone_".len()..]
                ))),
            },
        }
    };
    Ok(Some(KeystoneConfig {
        auth_url: auth_url.trim().to_string(),
        auth,
        cache_seconds: number("keystone_cache_seconds", 300, 0)?,
        cache_size: usize::try_from(number("keystone_cache_size", 10_000, 1)?)
            .unwrap_or(usize::MAX),
        timeout: number("keystone_timeout", 10, 1)?,
    }))
}

/// The default `host_id`: the machine's host name and the workspace directory, which
/// holds what only this host has (staged uploads).
fn default_host_id(workspace: &Path) -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let dir = std::path::absolute(workspace).unwrap_or_else(|_| workspace.to_path_buf());
    format!("{name}:{}", dir.display())
}

/// Glance's whole `disk_format` vocabulary (its default `[image_format] disk_formats`).
pub const GLANCE_DISK_FORMATS: &[&str] = &[
    "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop",
];

/// Glance's `container_format` vocabulary; vimport accepts only `bare`.
pub const GLANCE_CONTAINER_FORMATS: &[&str] = &[
    "ami",
    "ari",
    "aki",
    "bare",
    "ovf",
    "ova",
    "docker",
    "compressed",
];

/// The `disk_format` values vimport accepts for uploads: the engine's formats, and
/// `iso` (stored as uploaded, see [`DiskFormat::Iso`]).
pub const ACCEPTED_DISK_FORMATS: &str = "raw, qcow2, vdi, vmdk, vhd, vhdx, iso";

/// A declared `disk_format` vimport accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// A format the engine reads and converts.
    Engine(Format),
    /// An ISO 9660 / UDF image: inspected as an ISO (`DeclaredFormat::Iso`: it must
    /// not be another format in disguise) and stored as uploaded, never converted.
    Iso,
}

impl DiskFormat {
    /// Glance's name of it.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Engine(f) => disk_format_name(f),
            DiskFormat::Iso => "iso",
        }
    }
}

/// Parses a declared `disk_format` in Glance's vocabulary (`vpc` is accepted as `vhd`).
/// Glance's formats that vimport does not convert are refused with a message naming
/// those it accepts.
pub fn parse_declared_format(s: &str) -> Result<DiskFormat, String> {
    match s {
        "raw" => Ok(DiskFormat::Engine(Format::Raw)),
        "qcow2" => Ok(DiskFormat::Engine(Format::Qcow2)),
        "vdi" => Ok(DiskFormat::Engine(Format::Vdi)),
        "vmdk" => Ok(DiskFormat::Engine(Format::Vmdk)),
        "vhd" | "vpc" => Ok(DiskFormat::Engine(Format::Vpc)),
        "vhdx" => Ok(DiskFormat::Engine(Format::Vhdx)),
        "iso" => Ok(DiskFormat::Iso),
        other if GLANCE_DISK_FORMATS.contains(&other) => Err(format!(
            "disk_format '{other}' is not supported: vimport converts every upload and cannot read {other}; accepted formats: {ACCEPTED_DISK_FORMATS}"
        )),
        other => Err(format!(
            "disk_format '{other}' is not a Glance disk format; accepted formats: {ACCEPTED_DISK_FORMATS}"
        )),
    }
}

/// Parses the `output_format` key: a format the engine writes.
pub fn parse_disk_format(s: &str) -> Result<Format, String> {
    match parse_declared_format(s) {
        Ok(DiskFormat::Engine(f)) => Ok(f),
        Ok(DiskFormat::Iso) => Err(
            "iso cannot be an output_format; supported formats: raw, qcow2, vdi, vmdk, vhd, vhdx".into(),
        ),
        Err(_) => Err(format!(
            "disk_format '{s}' is not supported; supported formats: raw, qcow2, vdi, vmdk, vhd, vhdx"
        )),
    }
}

/// The Glance name of a format (vpc is `vhd`).
pub fn disk_format_name(f: Format) -> &'static str {
    match f {
        Format::Vpc => "vhd",
        other => other.name(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_file_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::load(None, &env(&[("VIMPORT_DATA_DIR", "/d")])).unwrap();
        assert_eq!(c.output_format, Format::Raw);
        assert_eq!(c.max_workers, 2);
        assert_eq!(
            c.convert_threads,
            std::thread::available_parallelism().unwrap().get()
        );
        assert_eq!(c.image_size_cap, 1 << 40);
        assert_eq!(c.workspace_dir, PathBuf::from("/d/workspace"));
        assert_eq!(c.listen, "127.0.0.1:9292");
        assert_eq!(
            c.vmdk_allowed_types,
            vec!["streamOptimized", "monolithicSparse"]
        );

        let file = dir.path().join("vimport.toml");
        std::fs::write(&file, "output_format = \"qcow2\"\nmax_workers = 4\nworkspace_bytes = \"10G\"\nvmdk_allowed_types = [\"streamOptimized\"]\n").unwrap();
        let c = Config::load(
            Some(&file),
            &env(&[
                ("VIMPORT_MAX_WORKERS", "3"),
                ("VIMPORT_CONVERT_THREADS", "1"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.output_format, Format::Qcow2);
        assert_eq!(c.max_workers, 3, "the environment wins over the file");
        assert_eq!(c.convert_threads, 1);
        assert_eq!(c.workspace_bytes, 10 << 30);
        assert_eq!(c.vmdk_allowed_types, vec!["streamOptimized"]);

        let c = Config::load(
            None,
            &env(&[
                ("VIMPORT_TOKENS", "s1:p1:admin, s2:p2"),
                ("VIMPORT_WEB_DOWNLOAD_ALLOWED_PORTS", ""),
                ("VIMPORT_WEB_DOWNLOAD_DISALLOWED_HOSTS", "Example.com"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.tokens,
            vec![
                TokenEntry {
                    token: "s1".into(),
                    project_id: "p1".into(),
                    admin: true
                },
                TokenEntry {
                    token: "s2".into(),
                    project_id: "p2".into(),
                    admin: false
                }
            ]
        );
        assert!(c.web_download.allowed_ports.is_empty());
        std::fs::write(
            &file,
            "token = \"old\"\ntokens = [\"s3:p3\", \"s4:p4:admin\"]\nshutdown_grace = 5\n",
        )
        .unwrap();
        let f = Config::load(Some(&file), &env(&[])).unwrap();
        assert_eq!(f.token.as_deref(), Some("old"));
        assert_eq!(f.tokens.len(), 2);
        assert!(f.tokens[1].admin && !f.tokens[0].admin);
        assert_eq!(f.shutdown_grace, 5);
        assert_eq!(c.web_download.disallowed_hosts, vec!["example.com"]);
        assert_eq!(c.web_download.allowed_schemes, vec!["http", "https"]);
        assert_eq!(c.shutdown_grace, 30);
    }

    #[test]
    fn glance_formats_outside_the_engine_are_refused_by_name() {
        assert_eq!(parse_declared_format("iso"), Ok(DiskFormat::Iso));
        assert_eq!(
            parse_declared_format("vpc"),
            Ok(DiskFormat::Engine(Format::Vpc))
        );
        assert_eq!(
            parse_declared_format("vhdx"),
            Ok(DiskFormat::Engine(Format::Vhdx))
        );
        for f in ["ploop", "ami", "nope"] {
            let e = parse_declared_format(f).unwrap_err();
            assert!(e.contains(f) && e.contains(ACCEPTED_DISK_FORMATS), "{e}");
        }
    }

    #[test]
    fn errors_name_the_key_and_its_source() {
        let e = Config::load(None, &env(&[("VIMPORT_MAX_WORKERS", "zero")])).unwrap_err();
        assert!(
            e.0.contains("max_workers") && e.0.contains("VIMPORT_MAX_WORKERS"),
            "{e}"
        );
        for bad in ["-1", "many", "40000"] {
            let e = Config::load(None, &env(&[("VIMPORT_CONVERT_THREADS", bad)])).unwrap_err();
            assert!(
                e.0.contains("convert_threads") && e.0.contains(bad) && e.0.contains("1024"),
                "{e}"
            );
        }
        let e = Config::load(None, &env(&[("VIMPORT_OUTPUT_FORMAT", "ploop")])).unwrap_err();
        assert!(e.0.contains("ploop") && e.0.contains("raw, qcow2"), "{e}");
        let e = Config::load(None, &env(&[("VIMPORT_TOKENS", "a:p:root")])).unwrap_err();
        assert!(e.0.contains("tokens") && e.0.contains("admin"), "{e}");
        let e = Config::load(None, &env(&[("VIMPORT_WORKERS", "1")])).unwrap_err();
        assert!(e.0.contains("unknown configuration key 'workers'"), "{e}");
    }

    #[test]
    fn rbd_settings_have_glance_defaults_and_are_checked() {
        let c = Config::load(None, &env(&[])).unwrap();
        assert_eq!(c.store, StoreKind::Fs);
        assert_eq!(c.rbd.pool, "images");
        assert_eq!(c.rbd.user, None);
        assert_eq!(c.rbd.chunk_size, 8 << 20);
        assert_eq!(c.rbd.order(), 23);
        assert!(c.rbd.snapshot);
        let c = Config::load(
            None,
            &env(&[
                ("VIMPORT_STORE", "rbd"),
                ("VIMPORT_RBD_POOL", "glance"),
                ("VIMPORT_RBD_USER", "client.glance"),
                ("VIMPORT_CEPH_CONF", "/etc/ceph/x.conf"),
                ("VIMPORT_RBD_CHUNK_SIZE", "4M"),
                ("VIMPORT_RBD_SNAPSHOT", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(c.store, StoreKind::Rbd);
        assert_eq!(c.rbd.pool, "glance");
        assert_eq!(c.rbd.user.as_deref(), Some("glance"));
        assert_eq!(c.rbd.ceph_conf, Some(PathBuf::from("/etc/ceph/x.conf")));
        assert_eq!(c.rbd.order(), 22);
        assert!(!c.rbd.snapshot);
        for (k, v, says) in [
            ("VIMPORT_STORE", "swift", "not fs or rbd"),
            ("VIMPORT_RBD_CHUNK_SIZE", "3M", "power of two"),
            ("VIMPORT_RBD_CHUNK_SIZE", "64M", "power of two"),
            ("VIMPORT_RBD_SNAPSHOT", "maybe", "true or false"),
        ] {
            let e = Config::load(None, &env(&[(k, v)])).unwrap_err();
            assert!(e.0.contains(says) && e.0.contains(k), "{k}={v}: {e}");
        }
    }

    #[test]
    fn keystone_table_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vimport.toml");
        std::fs::write(
            &file,
            "[keystone]\nauth_url = \"http://127.0.0.1:5000/v3\"\nusername = \"glance\"\n\
             password = \"pw\"\nproject_name = \"service\"\ncache_seconds = 5\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), &env(&[])).unwrap();
        let k = c.keystone.expect("[keystone]");
        assert_eq!(k.auth_url, "http://127.0.0.1:5000/v3");
        assert_eq!(
            k.auth,
            KeystoneAuth::Password {
                username: "glance".into(),
                password: "pw".into(),
                user_domain_name: "Default".into(),
                project_name: "service".into(),
                project_domain_name: "Default".into(),
            }
        );
        assert_eq!((k.cache_seconds, k.cache_size, k.timeout), (5, 10_000, 10));
        assert!(
            !format!("{k:?}").contains("pw"),
            "secrets stay out of Debug"
        );
        let c = Config::load(
            None,
            &env(&[
                ("VIMPORT_KEYSTONE_AUTH_URL", "https://ks.example:5000"),
                ("VIMPORT_KEYSTONE_APPLICATION_CREDENTIAL_ID", "ac"),
                ("VIMPORT_KEYSTONE_APPLICATION_CREDENTIAL_SECRET", "s"),
                ("VIMPORT_KEYSTONE_CACHE_SIZE", "7"),
            ]),
        )
        .unwrap();
        let k = c.keystone.unwrap();
        assert_eq!(
            k.auth,
            KeystoneAuth::ApplicationCredential {
                id: "ac".into(),
                secret: "s".into()
            }
        );
        assert_eq!(k.cache_size, 7);
        assert_eq!(Config::load(None, &env(&[])).unwrap().keystone, None);
        let url = ("VIMPORT_KEYSTONE_AUTH_URL", "http://k:5000");
        for (pairs, says) in [
            (vec![("VIMPORT_KEYSTONE_USERNAME", "g")], "auth_url is not"),
            (vec![url], "credentials are missing"),
            (
                vec![url, ("VIMPORT_KEYSTONE_USERNAME", "g")],
                "password is missing",
            ),
            (
                vec![
                    url,
                    ("VIMPORT_KEYSTONE_USERNAME", "g"),
                    ("VIMPORT_KEYSTONE_PASSWORD", "p"),
                ],
                "project_name is missing",
            ),
            (
                vec![
                    ("VIMPORT_KEYSTONE_AUTH_URL", "k:5000"),
                    ("VIMPORT_KEYSTONE_USERNAME", "g"),
                ],
                "not an http",
            ),
            (
                vec![
                    url,
                    ("VIMPORT_KEYSTONE_APPLICATION_CREDENTIAL_ID", "a"),
                    ("VIMPORT_KEYSTONE_APPLICATION_CREDENTIAL_SECRET", "s"),
                    ("VIMPORT_KEYSTONE_CACHE_SIZE", "0"),
                ],
                "cache_size '0'",
            ),
            (
                vec![
                    url,
                    ("VIMPORT_KEYSTONE_APPLICATION_CREDENTIAL_ID", "a"),
                    ("VIMPORT_KEYSTONE_APPLICATION_CREDENTIAL_SECRET", "s"),
                    ("VIMPORT_TOKENS", "t:p"),
                ],
                "remove token/tokens or [keystone]",
            ),
        ] {
            let e = Config::load(None, &env(&pairs)).unwrap_err();
            assert!(e.0.contains(says), "{pairs:?}: {e}");
        }
    }
}
