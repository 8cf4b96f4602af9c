//! The element types of the training ops' own kernels: f32 (training) and f64 (the
//! gradient checks in the tests).

use crate::frozen::{FrozenWeight, Product};

/// f32 or f64: the arithmetic the attention, LoRA and elementwise ops need, and candle's
/// [`WithDType`](candle_core::WithDType) for storage and `from_f64`.
pub(crate) trait Real:
    'static
    + Copy
    + Default
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::ops::DivAssign
    + candle_core::WithDType
{
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;

    /// `x (m, k)` times `w` as `product` says, through [`FrozenWeight`]'s own kernel where
    /// this type and the CPU have one; `None` leaves the product to the `gemm` crate.
    fn packed_product(
        x: &[Self],
        m: usize,
        w: &FrozenWeight,
        product: Product,
    ) -> Option<Vec<Self>>;
}

macro_rules! real {
    ($t:ty, $packed:expr) => {
        impl Real for $t {
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn packed_product(
                x: &[Self],
                m: usize,
                w: &FrozenWeight,
                product: Product,
            ) -> Option<Vec<Self>> {
                $packed(x, m, w, product)
            }
        }
    };
}
real!(f32, |x, m, w: &FrozenWeight, product| w
    .product(x, m, product));
real!(f64, |_, _, _, _| None);
