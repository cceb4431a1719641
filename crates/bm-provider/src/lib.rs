//! bm-provider: to be filled.
