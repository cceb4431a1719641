//! bm-provider-fake: to be filled.
