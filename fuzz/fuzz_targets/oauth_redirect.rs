#![no_main]
//! The loopback redirect parser of `frontdesk auth login --browser`: any request target a local
//! process or a browser could send must be classified without a panic, and only a target
//! carrying the expected state may yield a code.

use frontdesk::oauth::login::{Redirect, redirect_result};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let target = String::from_utf8_lossy(data);
    let state = "k3Jq9-state_value";
    match redirect_result(&target, state) {
        Redirect::Code(_) | Redirect::Error(_) | Redirect::NoCode => {
            assert!(target.contains("state="), "accepted without a state: {target:?}");
        }
        Redirect::NotOurs => {}
    }
});
