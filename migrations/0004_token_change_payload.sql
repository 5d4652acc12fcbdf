-- Snapshot wake-ups name the token that changed (payload 'token:<token_id>'),
-- so a control plane can patch its snapshot for a revocation instead of
-- rebuilding 100 000 tokens. An empty payload (credential changes, older
-- replicas) still means "rebuild everything". Postgres folds identical
-- notifications of one transaction into one.
CREATE OR REPLACE FUNCTION mcp_token_notify_snapshot_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND (to_jsonb(NEW) - 'last_used_at') IS NOT DISTINCT FROM (to_jsonb(OLD) - 'last_used_at') THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('mcp_snapshot_changed', 'token:' || OLD.token_id);
    ELSE
        PERFORM pg_notify('mcp_snapshot_changed', 'token:' || NEW.token_id);
        IF TG_OP = 'UPDATE' AND NEW.token_id IS DISTINCT FROM OLD.token_id THEN
            PERFORM pg_notify('mcp_snapshot_changed', 'token:' || OLD.token_id);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
