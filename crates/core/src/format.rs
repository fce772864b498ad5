//! The image formats vconvert knows, named exactly as qemu-img names them.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A disk image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// Plain bytes, no metadata.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VirtualBox disk image.
    Vdi,
    /// VMware virtual disk.
    Vmdk,
    /// Virtual PC / Hyper-V VHD.
    Vpc,
    /// Hyper-V VHDX.
    Vhdx,
}

impl Format {
    /// Every format, in the order `--help` lists them.
    pub const ALL: [Format; 6] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vdi,
        Format::Vmdk,
        Format::Vpc,
        Format::Vhdx,
    ];

    /// qemu-img's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vdi => "vdi",
            Format::Vmdk => "vmdk",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Format::ALL.iter().map(|f| f.name()).collect();
                Error::invalid(format!(
                    "unknown image format '{s}'; valid formats: {}",
                    names.join(", ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        let err = "qed".parse::<Format>().unwrap_err().to_string();
        assert!(err.contains("qed") && err.contains("qcow2, vdi"), "{err}");
    }
}
