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
    "workspace_dir",
    "workspace_bytes",
    "store_dir",
    "database",
    "listen",
    "token",
    "convert_rate_limit",
];

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
    /// Staging and conversion space.
    pub workspace_dir: PathBuf,
    /// Bytes the workspace may hold (staged uploads plus reserved conversion outputs).
    pub workspace_bytes: u64,
    /// Where stored images live.
    pub store_dir: PathBuf,
    /// The SQLite database file.
    pub database: PathBuf,
    /// Address to listen on.
    pub listen: String,
    /// The bearer token clients must send; `None` means "generate one at start".
    pub token: Option<String>,
    /// Bytes per second a conversion may process (`None`: no limit).
    pub convert_rate_limit: Option<u64>,
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
            for (k, v) in table {
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
        let workspace_bytes = size("workspace_bytes", 64 << 30)?;
        if workspace_bytes == 0 {
            return Err(ConfigError("workspace_bytes must be more than 0".into()));
        }
        Ok(Config {
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
            workspace_dir: path_or("workspace_dir", data_dir.join("workspace")),
            workspace_bytes,
            store_dir: path_or("store_dir", data_dir.join("store")),
            database: path_or("database", data_dir.join("vimport.db")),
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

/// Glance's `disk_format` vocabulary: raw, qcow2, vdi, vmdk, vhd (our vpc; vpc is
/// accepted too).
pub fn parse_disk_format(s: &str) -> Result<Format, String> {
    match s {
        "raw" => Ok(Format::Raw),
        "qcow2" => Ok(Format::Qcow2),
        "vdi" => Ok(Format::Vdi),
        "vmdk" => Ok(Format::Vmdk),
        "vhd" | "vpc" => Ok(Format::Vpc),
        other => Err(format!(
            "disk_format '{other}' is not supported; supported formats: raw, qcow2, vdi, vmdk, vhd"
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
            &env(&[("VIMPORT_MAX_WORKERS", "3"), ("PATH", "/bin")]),
        )
        .unwrap();
        assert_eq!(c.output_format, Format::Qcow2);
        assert_eq!(c.max_workers, 3, "the environment wins over the file");
        assert_eq!(c.workspace_bytes, 10 << 30);
        assert_eq!(c.vmdk_allowed_types, vec!["streamOptimized"]);
    }

    #[test]
    fn errors_name_the_key_and_its_source() {
        let e = Config::load(None, &env(&[("VIMPORT_MAX_WORKERS", "zero")])).unwrap_err();
        assert!(
            e.0.contains("max_workers") && e.0.contains("VIMPORT_MAX_WORKERS"),
            "{e}"
        );
        let e = Config::load(None, &env(&[("VIMPORT_OUTPUT_FORMAT", "vhdx")])).unwrap_err();
        assert!(e.0.contains("vhdx") && e.0.contains("raw, qcow2"), "{e}");
        let e = Config::load(None, &env(&[("VIMPORT_WORKERS", "1")])).unwrap_err();
        assert!(e.0.contains("unknown configuration key 'workers'"), "{e}");
    }
}
