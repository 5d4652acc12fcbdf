-- InfraBox MCP gateway, migration 0002: per-user upstream InfraBox
-- credentials (global tokens, DESIGN §7), stored encrypted (AES-256-GCM).
-- The read credential has scope_push=false, the write one scope_push=true.

CREATE TABLE IF NOT EXISTS mcp_upstream_credential (
    user_id          uuid        PRIMARY KEY REFERENCES "user"(id) ON DELETE CASCADE,
    read_ciphertext  bytea,
    read_token_id    uuid,
    read_expires_at  timestamptz,
    write_ciphertext bytea,
    write_token_id   uuid,
    write_expires_at timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- A credential change (minted, replaced, retired) changes the snapshot.
CREATE OR REPLACE FUNCTION mcp_upstream_credential_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mcp_snapshot_changed', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS mcp_upstream_credential_changed ON mcp_upstream_credential;
CREATE TRIGGER mcp_upstream_credential_changed
    AFTER INSERT OR UPDATE OR DELETE ON mcp_upstream_credential
    FOR EACH ROW EXECUTE FUNCTION mcp_upstream_credential_notify();
