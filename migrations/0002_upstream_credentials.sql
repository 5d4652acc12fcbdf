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
