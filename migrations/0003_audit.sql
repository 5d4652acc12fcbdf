-- InfraBox MCP gateway, migration 0003: the audit trail (DESIGN §10).
--
-- mcp_access_log keeps every column of InfraBox's 00047 and gains, additively,
-- what Envoy's access-log entry and the filter's audit record carry. Rows
-- written by the token API have no node/VM/sequence.
--
-- Loss detection: every filter VM numbers its records 1, 2, 3…; a stream is
-- one (node, VM). mcp_audit_stream holds, per stream, the highest number seen
-- and the number up to which every record is accounted for (a row or a gap);
-- mcp_audit_gap holds each missing range found, and how many of its entries
-- arrived later after all.

ALTER TABLE mcp_access_log
    ADD COLUMN IF NOT EXISTS method      VARCHAR(16),
    ADD COLUMN IF NOT EXISTS path        VARCHAR(512),
    ADD COLUMN IF NOT EXISTS status_code SMALLINT,
    ADD COLUMN IF NOT EXISTS duration_us BIGINT,
    ADD COLUMN IF NOT EXISTS bytes_in    BIGINT,
    ADD COLUMN IF NOT EXISTS bytes_out   BIGINT,
    ADD COLUMN IF NOT EXISTS project_id  uuid,
    ADD COLUMN IF NOT EXISTS request_id  VARCHAR(128),
    ADD COLUMN IF NOT EXISTS route       VARCHAR(64),
    ADD COLUMN IF NOT EXISTS class       VARCHAR(16),
    ADD COLUMN IF NOT EXISTS node_id     VARCHAR(256),
    ADD COLUMN IF NOT EXISTS vm_id       VARCHAR(64),
    ADD COLUMN IF NOT EXISTS seq         BIGINT;

-- One row per record: a record delivered twice is stored once.
CREATE UNIQUE INDEX IF NOT EXISTS idx_mcp_access_log_stream_seq
    ON mcp_access_log (node_id, vm_id, seq) WHERE seq IS NOT NULL;
-- The access-log API: a token's rows, newest first.
CREATE INDEX IF NOT EXISTS idx_mcp_access_log_token_time
    ON mcp_access_log (token_id, accessed_at DESC, id DESC);

CREATE TABLE IF NOT EXISTS mcp_audit_stream (
    node_id      VARCHAR(256) NOT NULL,
    vm_id        VARCHAR(64)  NOT NULL,
    -- Every sequence number <= checked_seq is a row or inside a gap.
    checked_seq  BIGINT       NOT NULL DEFAULT 0,
    high_seq     BIGINT       NOT NULL DEFAULT 0,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, vm_id)
);

CREATE TABLE IF NOT EXISTS mcp_audit_gap (
    id          BIGSERIAL    PRIMARY KEY,
    node_id     VARCHAR(256) NOT NULL,
    vm_id       VARCHAR(64)  NOT NULL,
    first_seq   BIGINT       NOT NULL,
    last_seq    BIGINT       NOT NULL,
    missing     BIGINT       NOT NULL,
    -- Entries of the range that arrived after the gap was recorded.
    recovered   BIGINT       NOT NULL DEFAULT 0,
    detected_at timestamptz  NOT NULL DEFAULT now(),
    CHECK (first_seq >= 1 AND first_seq <= last_seq AND missing = last_seq - first_seq + 1)
);

CREATE INDEX IF NOT EXISTS idx_mcp_audit_gap_stream ON mcp_audit_gap (node_id, vm_id, first_seq);
CREATE INDEX IF NOT EXISTS idx_mcp_audit_gap_detected_at ON mcp_audit_gap (detected_at);
