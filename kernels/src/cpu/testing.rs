//! Test data shared by the CPU backend's tests.

use crate::Csr;

/// splitmix64: small, deterministic, good enough for test data.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub(crate) fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [-1, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        self.uniform() * 2.0 - 1.0
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub(crate) fn values(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| scale * self.unit()).collect()
    }
    /// Small integers in [-2, 2]: their dot products are exact in f32 in any
    /// order, so equal scores really are equal.
    pub(crate) fn integers(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.below(5) as f32 - 2.0).collect()
    }
    /// A `rows x cols` CSR holding each cell with probability `density`,
    /// values from `value`.
    pub(crate) fn csr(
        &mut self,
        rows: usize,
        cols: usize,
        density: f32,
        mut value: impl FnMut(&mut Rng) -> f32,
    ) -> Csr {
        let mut m = Csr {
            rows,
            cols,
            indptr: vec![0],
            indices: Vec::new(),
            values: Vec::new(),
        };
        for _ in 0..rows {
            for c in 0..cols {
                if self.uniform() < density {
                    m.indices.push(c as u32);
                    let v = value(self);
                    m.values.push(v);
                }
            }
            m.indptr.push(m.indices.len() as u64);
        }
        m
    }
    /// Confidences `1 + 20 u`, `u` uniform.
    pub(crate) fn confidences(&mut self, rows: usize, cols: usize, density: f32) -> Csr {
        self.csr(rows, cols, density, |r| 1.0 + 20.0 * r.uniform())
    }
}

/// The bits of every value (to compare results bit for bit).
pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
