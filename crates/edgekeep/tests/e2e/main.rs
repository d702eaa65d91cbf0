//! End-to-end tests: the real `edgekeep` binary runs as server and agents on
//! loopback, and the tests talk to it with real HTTP and S3 clients.

#[macro_use]
mod database;
mod harness;

mod auth;
mod cli;
mod imports;
mod jobs;
mod lem;
mod presigned;
mod quickstart;
mod restore;
