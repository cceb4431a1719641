//! bm-cli: to be filled.
