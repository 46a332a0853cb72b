//! A tiny random generator whose whole state is one `u64`, so it checkpoints exactly.
//!
//! It lives here, in the crate every other kiln crate depends on, because both the data
//! mixer and model initialization draw from it: initial weights are generated on the host
//! from `run.seed`, so they are identical on every backend.

/// SplitMix64 (Steele, Lea and Flood, 2014): fast, well mixed, and its state is a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Restores a generator from [`SplitMix64::state`].
    pub fn from_state(state: u64) -> Self {
        Self { state }
    }

    /// The whole state.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The generator after `draws` calls of [`Self::next_u64`], without making them (the
    /// state is a counter), so that a long stream can be drawn in parallel pieces.
    pub fn advanced(&self, draws: u64) -> Self {
        Self {
            state: self
                .state
                .wrapping_add(draws.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }

    /// A uniform float in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard normal sample (Box-Muller; one of the pair is discarded for simplicity).
    /// Always two draws of [`Self::next_u64`].
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restores_from_state() {
        let mut a = SplitMix64::new(7);
        a.next_u64();
        let mut b = SplitMix64::from_state(a.state());
        assert_eq!(a.next_u64(), b.next_u64());
        let x = a.next_f64();
        assert!((0.0..1.0).contains(&x));
    }

    #[test]
    fn advancing_skips_exactly_that_many_draws() {
        let mut a = SplitMix64::new(99);
        let b = a.advanced(10);
        for _ in 0..5 {
            a.next_normal();
        }
        assert_eq!(a, b);
    }
}
