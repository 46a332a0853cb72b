//! The Hilbert curve that packs a token sequence into a square grid, and the causal
//! neighbourhoods of the 2D convolution over it.
//!
//! Position `t` sits at cell `d2xy(order, t)` of a `2^order x 2^order` grid. Consecutive
//! positions are always grid neighbours, and positions close in the sequence mostly stay
//! close on the grid, so a small 2D window sees both the last few tokens and tokens from
//! further back that the curve folded nearby.

/// The cell `(x, y)` of position `d` on the Hilbert curve of a `2^order` grid.
pub fn d2xy(order: u32, d: usize) -> (usize, usize) {
    let n = 1usize << order;
    let (mut x, mut y) = (0usize, 0usize);
    let mut t = d;
    let mut s = 1usize;
    while s < n {
        let rx = 1 & (t / 2);
        let ry = 1 & (t ^ rx);
        rotate(s, &mut x, &mut y, rx, ry);
        x += s * rx;
        y += s * ry;
        t /= 4;
        s *= 2;
    }
    (x, y)
}

/// The position of cell `(x, y)` on the Hilbert curve of a `2^order` grid.
pub fn xy2d(order: u32, x: usize, y: usize) -> usize {
    let n = 1usize << order;
    let (mut x, mut y) = (x, y);
    let mut d = 0usize;
    let mut s = n / 2;
    while s > 0 {
        let rx = usize::from(x & s > 0);
        let ry = usize::from(y & s > 0);
        d += s * s * ((3 * rx) ^ ry);
        rotate(n, &mut x, &mut y, rx, ry);
        s /= 2;
    }
    d
}

/// Rotates and flips a quadrant so the curve's sub-curves join up.
fn rotate(n: usize, x: &mut usize, y: &mut usize, rx: usize, ry: usize) {
    if ry == 0 {
        if rx == 1 {
            *x = n - 1 - *x;
            *y = n - 1 - *y;
        }
        std::mem::swap(x, y);
    }
}

/// For every position of a sequence of length `seq`, the sequence indices of the cells in
/// its `kernel x kernel` window whose token comes earlier (`include_centre`: or is itself),
/// as `seq * kernel^2` indices in window order with a 0/1 mask; a tap outside the grid, on a
/// later or absent token, is masked and indexes position `seq` (one past the sequence, where
/// the convolution puts a row of zeros, so the gather needs no mask multiplication).
#[derive(Debug, Clone, PartialEq)]
pub struct GridTaps {
    /// Sequence index of each tap, `[seq * kernel^2]`.
    pub index: Vec<i64>,
    /// 1 where the tap is used, `[seq * kernel^2]`.
    pub mask: Vec<f32>,
}

impl GridTaps {
    /// The taps of a sequence of length `seq` (at most `4^order`).
    pub fn new(order: u32, seq: usize, kernel: usize, include_centre: bool) -> Self {
        let side = 1i64 << order;
        let half = (kernel / 2) as i64;
        let mut index = Vec::with_capacity(seq * kernel * kernel);
        let mut mask = Vec::with_capacity(seq * kernel * kernel);
        for t in 0..seq {
            let (x, y) = d2xy(order, t);
            for dy in -half..=half {
                for dx in -half..=half {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    let inside = (0..side).contains(&nx) && (0..side).contains(&ny);
                    let s = if inside {
                        xy2d(order, nx as usize, ny as usize)
                    } else {
                        usize::MAX
                    };
                    let used = inside && (s < t || (include_centre && s == t));
                    index.push(if used { s as i64 } else { seq as i64 });
                    mask.push(if used { 1.0 } else { 0.0 });
                }
            }
        }
        Self { index, mask }
    }

    /// Taps in use (the values the convolution gathers and multiplies per channel pair).
    pub fn used(&self) -> usize {
        self.mask.iter().filter(|m| **m > 0.0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_is_a_bijection_whose_steps_are_grid_neighbours() {
        for order in 1..=6 {
            let n = 1usize << order;
            let mut seen = vec![false; n * n];
            let mut prev = None;
            for d in 0..n * n {
                let (x, y) = d2xy(order, d);
                assert!(x < n && y < n);
                assert!(!seen[y * n + x], "order {order}: cell ({x}, {y}) twice");
                seen[y * n + x] = true;
                assert_eq!(xy2d(order, x, y), d, "order {order}: inverse at {d}");
                if let Some((px, py)) = prev {
                    let step = (x as i64 - px as i64).abs() + (y as i64 - py as i64).abs();
                    assert_eq!(step, 1, "order {order}: {d} is not next to {}", d - 1);
                }
                prev = Some((x, y));
            }
        }
        // The card's grid: 256 x 256 = 65,536 positions.
        assert_eq!(d2xy(8, 65_535).0.max(d2xy(8, 65_535).1), 255);
    }

    #[test]
    fn taps_only_reach_earlier_tokens_and_the_centre_after_the_first_layer() {
        let first = GridTaps::new(3, 23, 3, false);
        let later = GridTaps::new(3, 23, 3, true);
        for t in 0..23 {
            for j in 0..9 {
                let i = t * 9 + j;
                if first.mask[i] > 0.0 {
                    assert!((first.index[i] as usize) < t);
                } else {
                    assert_eq!(first.index[i], 23, "an unused tap reads the zero row");
                }
                if later.mask[i] > 0.0 {
                    assert!((later.index[i] as usize) <= t);
                } else {
                    assert_eq!(later.index[i], 23);
                }
            }
            // The centre tap (j = 4) is the token itself.
            assert_eq!(first.mask[t * 9 + 4], 0.0);
            assert_eq!(
                (later.mask[t * 9 + 4], later.index[t * 9 + 4]),
                (1.0, t as i64)
            );
            // The previous token is always a neighbour, hence a tap.
            if t > 0 {
                assert!(
                    (0..9)
                        .any(|j| first.mask[t * 9 + j] > 0.0
                            && first.index[t * 9 + j] == t as i64 - 1)
                );
            }
        }
        assert_eq!(later.used(), first.used() + 23);
    }
}
