//! xtask. fn main() {}
fn main() {}
