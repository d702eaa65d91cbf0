//! The CLI groups that drive the REST API.

pub mod backup;
pub mod device;
pub mod job;
pub mod project;
pub mod token;
