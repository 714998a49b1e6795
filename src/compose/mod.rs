//! Composition math (filled in next).
