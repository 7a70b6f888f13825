pub use afm_lm as lm;
