pub use afm_fusion as fusion;
pub use afm_lm as lm;
pub use afm_vision as vision;

pub mod hub;
pub mod models;
