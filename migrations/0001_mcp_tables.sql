-- InfraBox MCP gateway, migration 0001: the MCP tables with exactly the
-- columns, defaults and index names of InfraBox's 00047, created only if
-- absent (an installation that ran 00047 keeps its tokens), plus a trigger
-- that wakes every control-plane replica on any token change.
-- timestamp (without time zone) columns hold naive UTC, as InfraBox does.

CREATE TABLE IF NOT EXISTS mcp_token (
    token_id      VARCHAR(16)  NOT NULL,
    token_hash    VARCHAR(64)  NOT NULL,
    user_id       uuid         NOT NULL REFERENCES "user"(id) ON DELETE CASCADE,
    name          VARCHAR(128) NOT NULL,
    enabled_projects JSONB     NOT NULL DEFAULT '{}',
    allow_trigger BOOLEAN      NOT NULL DEFAULT FALSE,
    expires_at    TIMESTAMP    NOT NULL,
    revoked_at    TIMESTAMP,
    last_used_at  TIMESTAMP,
    created_at    TIMESTAMP    NOT NULL DEFAULT NOW(),
    PRIMARY KEY (token_id)
);

CREATE INDEX IF NOT EXISTS idx_mcp_token_user_id ON mcp_token(user_id);
CREATE INDEX IF NOT EXISTS idx_mcp_token_hash    ON mcp_token(token_hash);

CREATE TABLE IF NOT EXISTS mcp_access_log (
    id          uuid         DEFAULT gen_random_uuid() NOT NULL,
    token_id    VARCHAR(16),
    user_id     uuid,
    action      VARCHAR(128) NOT NULL,
    outcome     VARCHAR(32)  NOT NULL,
    details     JSONB,
    error       TEXT,
    ip          VARCHAR(64),
    accessed_at TIMESTAMP    NOT NULL DEFAULT NOW(),
    PRIMARY KEY (id)
);

CREATE INDEX IF NOT EXISTS idx_mcp_access_log_token_id    ON mcp_access_log(token_id);
CREATE INDEX IF NOT EXISTS idx_mcp_access_log_accessed_at ON mcp_access_log(accessed_at);

-- Any change to mcp_token (by the API of any replica, by InfraBox, or by
-- direct SQL) notifies 'mcp_snapshot_changed'; an UPDATE that only touches
-- last_used_at does not (the snapshot does not contain it).
CREATE OR REPLACE FUNCTION mcp_token_notify_snapshot_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND (to_jsonb(NEW) - 'last_used_at') IS NOT DISTINCT FROM (to_jsonb(OLD) - 'last_used_at') THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('mcp_snapshot_changed', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS mcp_token_snapshot_changed ON mcp_token;
CREATE TRIGGER mcp_token_snapshot_changed
    AFTER INSERT OR UPDATE OR DELETE ON mcp_token
    FOR EACH ROW EXECUTE FUNCTION mcp_token_notify_snapshot_changed();
