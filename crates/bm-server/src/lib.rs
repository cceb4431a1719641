//! bm-server: to be filled.
