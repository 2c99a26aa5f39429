-- opsgate team mode on PostgreSQL: the grants of the server role and the worker role.
--
-- Run as the owner of opsgate's tables (the role that runs `opsgate init`), after every
-- `opsgate init` that adds tables. Rename opsgate_server / opsgate_worker to your login
-- roles. People, agents and CI get no database role at all: they hold API tokens for
-- `opsgate server`. Nothing here grants DELETE: the store never deletes.

-- The API server: reads everything, writes what the gate writes (proposals, decisions,
-- approvals, expiry, the audit chain) and reads, never writes, the API tokens (an
-- administrator issues them with `opsgate token` as the owner). Every decision reads the
-- trust resets (the proposer's track record); a lead's `opsgate trust reset` through the
-- server appends one. Its own executor carries out `run` and `rollback`, registered as a
-- worker: so it writes what a worker writes.
GRANT SELECT ON actions, decisions, approvals, audit_events, audit_head, audit_checkpoints,
    segments, executions, measurements, workers, api_tokens, outbox, trust_resets,
    track_record_days, track_record_latest TO opsgate_server;
GRANT INSERT, UPDATE ON actions, decisions, approvals, audit_events, audit_head, segments,
    executions, measurements, workers, outbox, track_record_days, track_record_latest
    TO opsgate_server;
-- Signed checkpoints (OPSGATE_AUDIT_KEY) and trust resets are appended, never changed.
GRANT INSERT ON audit_checkpoints, trust_resets TO opsgate_server;

-- A worker: claims approved actions, runs, verifies and rolls them back, heartbeats.
-- It never approves (no write on approvals) and never sees the API tokens; it reads the
-- trust resets (the execution re-check reads the proposer's track record). Both roles
-- keep the track record's summary (track_record_*) in the transactions that write the
-- facts it counts.
GRANT SELECT ON actions, decisions, approvals, audit_events, audit_head, audit_checkpoints,
    segments, executions, measurements, workers, trust_resets, track_record_days,
    track_record_latest TO opsgate_worker;
GRANT INSERT, UPDATE ON actions, decisions, audit_events, audit_head, segments, executions,
    measurements, workers, track_record_days, track_record_latest TO opsgate_worker;
GRANT INSERT ON audit_checkpoints TO opsgate_worker;
-- Notifications are enqueued in the transaction of the change (rolled back, blocked...);
-- only the server delivers them.
GRANT INSERT ON outbox TO opsgate_worker;

GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO opsgate_server, opsgate_worker;
