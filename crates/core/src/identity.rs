//! Identifiers that formats store (UUIDs, CIDs, unique ids): random by default,
//! reproducible from a seed when the caller asks for it.

use crate::{Error, Result};

/// A source of identifiers: the OS's random numbers, or a seeded sequence.
#[derive(Clone, Debug)]
pub struct Identity {
    seeded: Option<u64>,
}

impl Identity {
    /// Random identifiers, or the sequence of `seed`.
    pub fn new(seed: Option<u64>) -> Self {
        Identity { seeded: seed }
    }

    /// True when the identifiers come from a seed (writers then also store fixed
    /// timestamps, so the output is reproducible).
    pub fn is_seeded(&self) -> bool {
        self.seeded.is_some()
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> Result<u64> {
        match &mut self.seeded {
            Some(state) => {
                // splitmix64
                *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = *state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                Ok(z ^ (z >> 31))
            }
            None => getrandom::u64()
                .map_err(|e| Error::invalid(format!("cannot get random numbers: {e}"))),
        }
    }

    /// A random (version 4, RFC 4122 variant) UUID, as 16 bytes in RFC order.
    pub fn uuid_v4(&mut self) -> Result<[u8; 16]> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next_u64()?.to_be_bytes());
        b[8..].copy_from_slice(&self.next_u64()?.to_be_bytes());
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_is_reproducible_and_random_is_not() {
        let a = Identity::new(Some(1)).uuid_v4().unwrap();
        assert_eq!(a, Identity::new(Some(1)).uuid_v4().unwrap());
        assert_ne!(a, Identity::new(Some(2)).uuid_v4().unwrap());
        assert_eq!(a[6] >> 4, 4);
        assert_eq!(a[8] >> 6, 2);
        let mut r = Identity::new(None);
        assert_ne!(r.uuid_v4().unwrap(), r.uuid_v4().unwrap());
    }
}
