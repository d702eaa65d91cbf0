//! End-to-end tests: the real `edgekeep` binary runs as server and agents on
//! loopback, and the tests talk to it with real HTTP and S3 clients.

mod harness;

mod auth;
mod imports;
mod jobs;
mod lem;
mod presigned;
mod quickstart;
mod restore;
