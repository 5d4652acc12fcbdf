-- InfraBox MCP gateway, migration 0005: coalesced denials (DESIGN §10).
--
-- A flood of identical denials from one address (say, bad tokens) is one
-- row per interval for the first denial, as always, plus one row whose
-- `count` holds the identical denials counted after it. Every other row
-- stands for one request. Additive; existing rows count 1.

ALTER TABLE mcp_access_log
    ADD COLUMN IF NOT EXISTS count INTEGER NOT NULL DEFAULT 1;
