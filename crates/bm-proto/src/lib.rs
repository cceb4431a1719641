//! bm-proto: to be filled.
