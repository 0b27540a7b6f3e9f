//! Block digests: the image's identity, block by block.
//!
//! At preparation (or while `flashbay write` streams the image) every
//! [`BLOCK`] of the *decoded source stream* gets a 128-bit XXH3 digest.
//! Verification then checks what the card returns against these digests,
//! never against a second read of a cache that may have rotted since, and
//! the writer checks what it reads from the cache before the card gets it.
//!
//! Why XXH3-128 and 1 MiB (scripts/bench-hash, docs/benchmarks.md): it
//! hashes at ~16 GiB/s on one core here (0.06 CPU-s per GiB; BLAKE3 0.17,
//! SHA-256 0.76), so checking costs less than the 0.1 CPU-s per
//! GiB and leaves a Raspberry Pi 4 core mostly free at 8 cards × 40 MB/s.
//! The threat is rot and stray writes, not an adversary: the whole-image
//! SHA-256 stays the published identity. 1 MiB keeps the table small (16
//! bytes per MiB: 24 KiB for a 1.5 GiB image) and is the unit every chunk
//! size is a multiple of.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

/// Bytes covered by one digest; the last block of an image may be shorter.
pub const BLOCK: usize = 1 << 20;

/// The digests of an image's raw bytes, one per [`BLOCK`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockDigests {
    /// Raw size of the image: the last block covers `len % BLOCK` bytes.
    pub len: u64,
    digests: Vec<u128>,
}

impl BlockDigests {
    /// Checks `data`, which starts at `offset` (a multiple of [`BLOCK`]),
    /// block by block; `Err` carries the offset of the first block that
    /// differs (or lies past the image).
    pub fn check(&self, offset: u64, data: &[u8]) -> Result<(), u64> {
        for (i, block) in data.chunks(BLOCK).enumerate() {
            let at = offset + (i * BLOCK) as u64;
            let expected = usize::try_from(at / BLOCK as u64).ok().and_then(|n| self.digests.get(n));
            if expected != Some(&xxh3_128(block)) {
                return Err(at);
            }
        }
        Ok(())
    }

    /// Bytes of the block starting at `offset` that belong to the image.
    pub fn block_len(&self, offset: u64) -> usize {
        usize::try_from(self.len.saturating_sub(offset)).map_or(BLOCK, |n| n.min(BLOCK))
    }

    pub fn blocks(&self) -> usize {
        self.digests.len()
    }
}

/// Builds [`BlockDigests`] from the raw stream, fed in order in pieces of
/// any size.
#[derive(Clone)]
pub struct Digester {
    current: Xxh3,
    filled: usize,
    len: u64,
    digests: Vec<u128>,
}

impl std::fmt::Debug for Digester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Digester").field("len", &self.len).finish_non_exhaustive()
    }
}

impl Default for Digester {
    fn default() -> Self {
        Self { current: Xxh3::new(), filled: 0, len: 0, digests: Vec::new() }
    }
}

impl Digester {
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while !data.is_empty() {
            // Whole blocks on a boundary: the one-shot hash, no copying.
            if self.filled == 0 && data.len() >= BLOCK {
                self.digests.push(xxh3_128(&data[..BLOCK]));
                data = &data[BLOCK..];
                continue;
            }
            let n = (BLOCK - self.filled).min(data.len());
            self.current.update(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == BLOCK {
                self.push_current();
            }
        }
    }

    pub fn finish(mut self) -> BlockDigests {
        if self.filled > 0 {
            self.push_current();
        }
        BlockDigests { len: self.len, digests: self.digests }
    }

    fn push_current(&mut self) {
        // Streaming and one-shot XXH3 agree, so a block hashes the same
        // however it arrived.
        self.digests.push(self.current.digest128());
        self.current.reset();
        self.filled = 0;
    }
}

/// Stored as `{"len": N, "xxh3": "<32 hex digits per block>"}` beside the
/// prepared image's other facts.
impl Serialize for BlockDigests {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        use std::fmt::Write;
        let hex = self.digests.iter().fold(String::with_capacity(self.digests.len() * 32), |mut hex, d| {
            let _ = write!(hex, "{d:032x}");
            hex
        });
        let mut st = s.serialize_struct("BlockDigests", 2)?;
        st.serialize_field("len", &self.len)?;
        st.serialize_field("xxh3", &hex)?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for BlockDigests {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            len: u64,
            xxh3: String,
        }
        let raw = Raw::deserialize(d)?;
        let bad = || serde::de::Error::custom("malformed block digests");
        if raw.xxh3.len() % 32 != 0 || !raw.xxh3.is_ascii() {
            return Err(bad());
        }
        let digests = (0..raw.xxh3.len())
            .step_by(32)
            .map(|i| u128::from_str_radix(&raw.xxh3[i..i + 32], 16).map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        if digests.len() as u64 != raw.len.div_ceil(BLOCK as u64) {
            return Err(bad());
        }
        Ok(Self { len: raw.len, digests })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect()
    }

    #[test]
    fn digests_do_not_depend_on_how_the_stream_is_cut() {
        let bytes = data(3 * BLOCK + 12_345);
        let mut whole = Digester::default();
        whole.update(&bytes);
        let whole = whole.finish();
        let mut pieces = Digester::default();
        for piece in bytes.chunks(77_777) {
            pieces.update(piece);
        }
        assert_eq!(pieces.finish(), whole);
        assert_eq!(whole.blocks(), 4);
        assert_eq!(whole.block_len(3 * BLOCK as u64), 12_345);
        assert_eq!(whole.check(0, &bytes), Ok(()));
        assert_eq!(whole.check(2 * BLOCK as u64, &bytes[2 * BLOCK..]), Ok(()));
    }

    #[test]
    fn one_changed_byte_names_its_block() {
        let mut bytes = data(4 * BLOCK);
        let mut d = Digester::default();
        d.update(&bytes);
        let d = d.finish();
        bytes[2 * BLOCK + 5] ^= 1;
        assert_eq!(d.check(0, &bytes), Err(2 * BLOCK as u64));
        // Past the image is a mismatch too, never a silent pass.
        assert_eq!(d.check(4 * BLOCK as u64, &bytes[..BLOCK]), Err(4 * BLOCK as u64));
    }

    #[test]
    fn round_trips_through_json_and_rejects_damage() {
        let mut d = Digester::default();
        d.update(&data(BLOCK + 1));
        let d = d.finish();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<BlockDigests>(&json).unwrap(), d);
        let cut = json.replacen("\"len\":1048577", "\"len\":99999999", 1);
        assert!(serde_json::from_str::<BlockDigests>(&cut).is_err());
    }
}
