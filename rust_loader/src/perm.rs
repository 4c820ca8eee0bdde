//! Seeded random permutations of `0..n` that need O(1) memory.
//!
//! A 4-round Feistel network is a bijection on `0..4^k`; "cycle walking" (re-applying it until
//! the value falls below `n`) restricts it to a bijection on `0..n`. So every window/row/batch
//! is visited exactly once per epoch without materializing a shuffled index, which keeps host
//! memory flat however large the token file is.

/// SplitMix64: a tiny, well-mixed hash used for round keys and round functions.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Mixes several words into one seed (order matters).
pub fn mix(parts: &[u64]) -> u64 {
    parts.iter().fold(0x6a09_e667_f3bc_c908, |acc, &p| splitmix64(acc ^ splitmix64(p)))
}

/// Fisher-Yates shuffle driven by a SplitMix64 stream: for lists that are materialized anyway,
/// a few ns per element instead of a Feistel evaluation per lookup.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    for i in (1..items.len()).rev() {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        // Lemire's multiply-shift maps 64 random bits onto 0..=i (bias < 2^-40 here).
        let j = ((u128::from(splitmix64(state)) * (i as u128 + 1)) >> 64) as usize;
        items.swap(i, j);
    }
}

const ROUNDS: usize = 4;

#[derive(Debug, Clone)]
pub struct Permutation {
    n: u64,
    /// Identity when not shuffling (validation data, `shuffle=False`).
    shuffle: bool,
    half_bits: u32,
    keys: [u64; ROUNDS],
}

impl Permutation {
    pub fn new(n: u64, seed: u64, shuffle: bool) -> Self {
        // Smallest even bit width covering 0..n, so the domain is at most 4n (≤ 4 walks on average).
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let mut keys = [0; ROUNDS];
        for (i, k) in keys.iter_mut().enumerate() {
            *k = mix(&[seed, i as u64]);
        }
        Self { n, shuffle, half_bits, keys }
    }

    /// The image of `i` (`i < n`).
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        if !self.shuffle {
            return i;
        }
        let mut x = i;
        loop {
            x = self.encrypt(x);
            if x < self.n {
                return x;
            }
        }
    }

    fn encrypt(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for key in self.keys {
            let f = splitmix64(right ^ key) & mask;
            (left, right) = (right, left ^ f);
        }
        (left << self.half_bits) | right
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_permutation() {
        for n in [1u64, 2, 3, 7, 64, 1000, 4097] {
            let p = Permutation::new(n, 42, true);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.apply(i) as usize;
                assert!(!seen[j], "n={n}: {j} twice");
                seen[j] = true;
            }
        }
    }

    #[test]
    fn shuffle_permutes() {
        let mut v: Vec<u32> = (0..1000).collect();
        shuffle(&mut v, 9);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn depends_on_seed_and_shuffles() {
        let a: Vec<u64> = (0..100).map(|i| Permutation::new(100, 1, true).apply(i)).collect();
        let b: Vec<u64> = (0..100).map(|i| Permutation::new(100, 2, true).apply(i)).collect();
        assert_ne!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        assert_eq!(Permutation::new(100, 1, false).apply(17), 17);
    }
}
