//! Faults.
pub mod network;
