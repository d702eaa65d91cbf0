//! edgekeep-server
