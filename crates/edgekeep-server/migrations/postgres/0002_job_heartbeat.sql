-- Time of the last sign of life of a running device job: its hand-out, a
-- progress report, or the server's validation of its upload. Stored here
-- rather than in server memory, so replicas on one database share it.
ALTER TABLE jobs ADD COLUMN heartbeat_at BIGINT;
