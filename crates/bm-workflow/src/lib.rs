//! bm-workflow: to be filled.
