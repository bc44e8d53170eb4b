//! A fast, unkeyed hasher (the multiply-rotate scheme of rustc's FxHash) for the maps a request
//! looks into: rate-limit counters by key and org id, idle upstream connections by address,
//! keys by their HMAC. None of those keys is chosen by a client (ids and addresses come from
//! the config; a key's HMAC is keyed by the secret pepper), so the DoS-resistant default
//! hasher buys nothing there and costs a SipHash per lookup.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(n as u64);
    }

    #[inline]
    fn write_u16(&mut self, n: u16) {
        self.add(n as u64);
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(n as u64);
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn distinct_ids_spread_and_equal_ids_agree() {
        let build = BuildHasherDefault::<FastHasher>::default();
        let ids: Vec<String> = (0..10_000).map(|i| format!("org-{i}")).collect();
        let hashes: std::collections::HashSet<u64> =
            ids.iter().map(|id| build.hash_one(id.as_str())).collect();
        assert_eq!(hashes.len(), ids.len(), "no collisions among 10,000 ids");
        assert_eq!(
            build.hash_one("org-7"),
            build.hash_one(String::from("org-7"))
        );
        // Shard choice (hash modulo 16) uses every shard.
        let shards: std::collections::HashSet<u64> = hashes.iter().map(|h| h % 16).collect();
        assert_eq!(shards.len(), 16);
    }
}
