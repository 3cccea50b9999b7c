//! Network faults.
pub mod encode;
