//! The block-quantized weights this crate multiplies: the kernels live in `ragtune-quant`
//! (shared with the sentence encoder); this module adds what is GGUF-specific, namely the
//! conversion of every other block format into one the kernels take ([`convert`]).

pub(crate) mod convert;

pub(crate) use ragtune_quant::{
    for_each_dynamic, QMatrix, QuantFormat, Q4_0, Q4_1, Q5_0, Q5_1, Q6K, Q8_0,
};

impl From<ragtune_quant::Error> for crate::Error {
    fn from(e: ragtune_quant::Error) -> Self {
        match e {
            ragtune_quant::Error::Unsupported { what } => crate::Error::Unsupported { what },
        }
    }
}
