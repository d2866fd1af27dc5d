//! Helpers shared by test files (`mod common;`); each uses some of them.
#![allow(dead_code)]

pub mod certs;
