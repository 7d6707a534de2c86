//! A small seeded random number generator for randomized tests: a failing case reproduces from
//! its seed, and an environment variable lets a run explore other seeds.

/// xorshift64*: small and deterministic.
pub struct Rng(u64);

impl Rng {
    /// From a non-zero seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The seed in environment variable `var`, to explore others, else `default`.
    pub fn from_env(var: &str, default: u64) -> Rng {
        let seed = std::env::var(var).ok().and_then(|s| s.parse().ok());
        Rng(seed.unwrap_or(default))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}
