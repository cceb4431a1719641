//! Integration tests of bm-domain: the precedence, admission and transition rules checked
//! against reference models over every (or many random) combinations of their inputs.

mod precedence;
mod round_trip;
mod strategies;
mod transitions;
