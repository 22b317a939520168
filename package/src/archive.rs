//! The deterministic archive writer.
