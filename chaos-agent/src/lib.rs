//! lymph-chaos agent library (all logic; `main.rs` only parses arguments and calls in here).
pub mod faults;
