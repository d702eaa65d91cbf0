//! edgekeep-agent
