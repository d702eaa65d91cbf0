//! edgekeep-archive
