//! bm-store: to be filled.
