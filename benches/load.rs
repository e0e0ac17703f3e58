//! Load bench: placeholder until it lands.
fn main() {}
