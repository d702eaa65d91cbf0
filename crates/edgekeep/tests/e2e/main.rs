//! End-to-end tests: the real `edgekeep` binary runs as server and agents on
//! loopback, and the tests talk to it with real HTTP and S3 clients.

#[macro_use]
mod database;
#[path = "../../../edgekeep-server/tests/common/garage.rs"]
mod garage;
mod harness;

mod auth;
mod cli;
mod external_s3;
mod imports;
mod jobs;
mod lem;
mod migrate;
mod presigned;
mod quickstart;
mod replica_failover;
mod restore;
