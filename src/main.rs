//! The `frontdesk` command line.

fn main() {}
