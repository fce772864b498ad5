//! Creation options (`-o key=value,...`) and qemu-style sizes (`4k`, `1.5G`).

use crate::{Error, Result};

/// Parses a size the way qemu-img does: a number with an optional binary suffix
/// `B`, `k`/`K`, `M`, `G`, `T`, `P`, `E` (case-insensitive); decimals allowed with a suffix.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || {
        Error::invalid(format!("invalid size '{s}': use a number of bytes with an optional suffix k, M, G, T, P or E (e.g. 4k, 10G)"))
    };
    let t = s.trim();
    let (num, suffix) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return Err(bad()),
    };
    if num.is_empty() || num.starts_with('-') || num.starts_with('+') {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift).ok_or_else(bad);
    }
    if shift == 0 {
        return Err(bad());
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let v = f * (1u64 << shift) as f64;
    if !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v as u64)
}

/// `key=value` creation options. Writers take the keys they know; [`Options::finish`]
/// rejects what is left, listing the valid keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    entries: Vec<(String, String)>,
}

impl Options {
    /// No options.
    pub fn new() -> Self {
        Options::default()
    }

    /// Parses `k=v,k2=v2` (qemu's `,,` escapes a comma in a value). Repeated `-o`
    /// arguments can be joined with commas before parsing.
    pub fn parse(s: &str) -> Result<Self> {
        let mut opts = Options::new();
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for item in items.into_iter().filter(|i| !i.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| {
                Error::invalid(format!("invalid option '{item}': expected key=value"))
            })?;
            opts.set(k, v);
        }
        Ok(opts)
    }

    /// Sets `key` to `value` (the last setting wins).
    pub fn set(&mut self, key: &str, value: &str) {
        self.entries.retain(|(k, _)| k != key);
        self.entries.push((key.to_string(), value.to_string()));
    }

    /// True when no option is left.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removes and returns `key`'s value.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(i).1)
    }

    /// Removes `key` and parses it as `on|off` (also `true|false|yes|no`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key).as_deref() {
            None => Ok(None),
            Some("on" | "true" | "yes") => Ok(Some(true)),
            Some("off" | "false" | "no") => Ok(Some(false)),
            Some(v) => Err(Error::invalid(format!(
                "invalid value '{v}' for option '{key}': use on or off"
            ))),
        }
    }

    /// Removes `key` and parses it as a size.
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>> {
        self.take(key)
            .map(|v| parse_size(&v).map_err(|e| Error::invalid(format!("option '{key}': {e}"))))
            .transpose()
    }

    /// Removes `key` and checks that its value is one of `allowed`.
    pub fn take_choice(&mut self, key: &str, allowed: &[&str]) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) if allowed.contains(&v.as_str()) => Ok(Some(v)),
            Some(v) => Err(Error::invalid(format!(
                "invalid value '{v}' for option '{key}'; valid values: {}",
                allowed.join(", ")
            ))),
        }
    }

    /// Fails if any option is left over, naming it and listing the keys `format` knows.
    pub fn finish(self, format: &str, valid: &[&str]) -> Result<()> {
        match self.entries.first() {
            None => Ok(()),
            Some((k, _)) => Err(Error::invalid(format!(
                "invalid option '{k}' for format '{format}'; valid options: {}",
                if valid.is_empty() {
                    "(none)".to_string()
                } else {
                    valid.join(", ")
                }
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("10M").unwrap(), 10 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("0").unwrap(), 0);
        for bad in ["", "k", "-1", "1x", "1.5", "99999999999E", "1.2.3M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_take_and_reject_leftovers() {
        let mut o = Options::parse("preallocation=full,name=a,,b,flag=on").unwrap();
        assert_eq!(o.take("name").as_deref(), Some("a,b"));
        assert_eq!(o.take_bool("flag").unwrap(), Some(true));
        assert_eq!(
            o.take_choice("preallocation", &["off", "full"])
                .unwrap()
                .as_deref(),
            Some("full")
        );
        assert!(o.is_empty());
        o.finish("raw", &["preallocation"]).unwrap();

        let o = Options::parse("bogus=1").unwrap();
        let e = o.finish("raw", &["preallocation"]).unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("preallocation"), "{e}");
        assert!(Options::parse("novalue").is_err());
        let mut o = Options::parse("x=maybe").unwrap();
        assert!(o.take_bool("x").is_err());
    }
}
