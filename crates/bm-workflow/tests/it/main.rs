//! Executor tests against the fake provider at instant timing: one per behaviour of spec 000
//! steps 5-9 and its FAQ, plus concurrency, cancellation, failure, resumption and streams.

mod concurrency;
mod fencing;
mod harness;
mod hold;
mod lifecycle;
mod resume;
mod rollouts;
mod status_poll;
mod streams;
