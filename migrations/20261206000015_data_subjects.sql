-- Data subjects: GDPR access (export) and erasure without breaking the audit chain.
--
-- The audit log is append-only and hash-chained, so personal data must never be written into
-- it. People are named there only by opaque references:
--   user:<uuid>     a console user; the email lives only in `users`;
--   subject:<uuid>  anyone else who acted (a Slack user pressing a button, an OS user running
--                   the CLI); the name lives only in `data_subjects`.
-- Erasure overwrites `users` and `data_subjects` rows; the chain keeps references that no
-- longer lead to a person, and `apitree audit verify` still passes.

CREATE TABLE data_subjects (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind        text NOT NULL CHECK (kind IN ('slack', 'os')),
    -- What the writer recorded (`alice (U123)`, `bob (TICKET-1)`); NULL once erased.
    label       text CHECK (label IS NULL OR length(label) BETWEEN 1 AND 500),
    -- The identity to search by: the Slack user id, the OS user name; NULL once erased.
    external_id text CHECK (external_id IS NULL OR length(external_id) BETWEEN 1 AND 200),
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    erased_at   timestamptz,
    CONSTRAINT data_subjects_erased CHECK ((erased_at IS NULL) = (label IS NOT NULL AND external_id IS NOT NULL))
);
CREATE UNIQUE INDEX data_subjects_label_idx ON data_subjects (kind, label) WHERE label IS NOT NULL;
CREATE INDEX data_subjects_external_idx ON data_subjects (kind, external_id);

ALTER TABLE users ADD COLUMN erased_at timestamptz;

-- Requests about a person's data, for the Customer Operations queue: who logged what request
-- when (`received`), and who carried it out when, with what outcome (`exported`, `erased`,
-- `refused`). A request carried out without being logged first is one row, received and done
-- at once. `subject` is a reference (`user:<uuid>`), never an email; actors are references too.
CREATE TABLE dsar_requests (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subject    text NOT NULL CHECK (subject ~ '^user:[0-9a-f-]{36}$'),
    kind       text NOT NULL CHECK (kind IN ('export', 'erase')),
    state      text NOT NULL CHECK (state IN ('received', 'exported', 'erased', 'refused')),
    actor      text NOT NULL CHECK (length(actor) > 0),
    reason     text CHECK (reason IS NULL OR length(btrim(reason)) BETWEEN 1 AND 1000),
    outcome    jsonb NOT NULL DEFAULT '{}'::jsonb,
    at         timestamptz NOT NULL DEFAULT now(),
    done_at    timestamptz,
    done_by    text CHECK (done_by IS NULL OR length(done_by) > 0),
    CONSTRAINT dsar_requests_done CHECK ((state = 'received') = (done_at IS NULL AND done_by IS NULL))
);
CREATE INDEX dsar_requests_subject_idx ON dsar_requests (subject, id);

-- A person's name in an actor (`slack:<name> (<id>)`, `os:<user> (<label>)`, in any case and
-- spacing) becomes a subject reference. Every writer goes through it: the triggers below call
-- it for audit_log, credit_ledger and dsar_requests.
CREATE FUNCTION apitree_actor_ref(p_actor text) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    m    text[];
    k    text;
    rest text;
    ext  text;
    sid  uuid;
BEGIN
    m := regexp_match(p_actor, '^[[:space:]]*(slack|os)[[:space:]]*:[[:space:]]*(.*)$', 'i');
    IF m IS NULL THEN
        RETURN p_actor;
    END IF;
    k := lower(m[1]);
    rest := m[2];
    -- The identity from the whole text, before the label is cut to length.
    ext := CASE k
        WHEN 'slack' THEN substring(rest FROM '\(([^() ]+)\)[[:space:]]*$')
        ELSE split_part(rest, ' (', 1)
    END;
    IF k = 'slack' AND ext IS NOT NULL THEN
        -- The name cut to length, the id kept whole: two people never share a label.
        rest := left(coalesce(nullif(btrim(regexp_replace(rest, '\([^() ]+\)[[:space:]]*$', '')), ''),
                              '(unnamed)'), 400)
                || ' (' || left(ext, 90) || ')';
    ELSE
        rest := left(coalesce(nullif(btrim(rest), ''), '(unnamed)'), 500);
    END IF;
    ext := left(coalesce(nullif(btrim(ext), ''), nullif(btrim(rest), ''), '(unnamed)'), 200);
    INSERT INTO data_subjects (kind, label, external_id)
    VALUES (k, rest, ext)
    ON CONFLICT (kind, label) WHERE label IS NOT NULL DO UPDATE SET last_seen = now()
    RETURNING id INTO sid;
    RETURN 'subject:' || sid::text;
END
$$;

-- `slack:<name>` of a known Slack subject inside a JSON document (a gate's "promoted by
-- slack:alice" in an audit row's detail) becomes the subject's reference. Names are matched in
-- their JSON-escaped form and never as the start of a longer name; the result is always valid
-- JSON (if it were not, the document is kept as it was rather than the row lost).
CREATE FUNCTION apitree_detail_refs(p_detail jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
DECLARE
    t   text := p_detail::text;
    tl  text := lower(p_detail::text);
    s   record;
    esc text;
    out jsonb;
BEGIN
    IF position('slack:' IN tl) = 0 THEN
        RETURN p_detail;
    END IF;
    FOR s IN
        SELECT d.id, split_part(d.label, ' (', 1) AS name
          FROM data_subjects d
         WHERE d.kind = 'slack' AND d.label IS NOT NULL AND split_part(d.label, ' (', 1) <> ''
         ORDER BY length(split_part(d.label, ' (', 1)) DESC
    LOOP
        esc := to_jsonb(s.name)::text;
        esc := substr(esc, 2, length(esc) - 2);
        IF position('slack:' || lower(esc) IN tl) > 0 THEN
            t := regexp_replace(t,
                'slack:' || regexp_replace(esc, '([^[:alnum:]])', '\\\1', 'g')
                    || '(?![.]*[[:alnum:]_-])',
                'subject:' || s.id::text, 'gi');
            tl := lower(t);
        END IF;
    END LOOP;
    BEGIN
        out := t::jsonb;
    EXCEPTION WHEN others THEN
        RETURN p_detail;
    END;
    RETURN out;
END
$$;

-- Fires before the chain trigger (triggers fire in name order).
CREATE FUNCTION audit_log_subject_ref() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    NEW.actor := apitree_actor_ref(NEW.actor);
    NEW.detail := apitree_detail_refs(NEW.detail);
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_log_actor_subject BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_subject_ref();

CREATE FUNCTION actor_subject_ref() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    NEW.actor := apitree_actor_ref(NEW.actor);
    RETURN NEW;
END
$$;
CREATE TRIGGER credit_ledger_actor_subject BEFORE INSERT ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION actor_subject_ref();
CREATE FUNCTION dsar_requests_subject_ref() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    NEW.actor := apitree_actor_ref(NEW.actor);
    IF NEW.done_by IS NOT NULL THEN
        NEW.done_by := apitree_actor_ref(NEW.done_by);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER dsar_requests_actor_subject BEFORE INSERT OR UPDATE ON dsar_requests
    FOR EACH ROW EXECUTE FUNCTION dsar_requests_subject_ref();

-- Records a request as carried out: the oldest request of that kind logged for the person and
-- still open becomes `p_state`, or, when none was logged, a new row is received and done at once.
CREATE FUNCTION dsar_done(p_subject text, p_kind text, p_state text, p_actor text,
                          p_reason text, p_outcome jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
BEGIN
    UPDATE dsar_requests
       SET state = p_state, done_at = now(), done_by = p_actor, outcome = p_outcome,
           reason = coalesce(reason, p_reason)
     WHERE id = (SELECT id FROM dsar_requests
                  WHERE subject = p_subject AND kind = p_kind AND state = 'received'
                  ORDER BY id LIMIT 1 FOR UPDATE);
    IF NOT FOUND THEN
        INSERT INTO dsar_requests (subject, kind, state, actor, reason, outcome, done_at, done_by)
        VALUES (p_subject, p_kind, p_state, p_actor, p_reason, p_outcome, now(), p_actor);
    END IF;
END
$$;

-- Whether `p_handles` are identities (`slack:<Slack user id>`, `os:<user name>`).
CREATE FUNCTION dsar_check_handles(p_handles text[]) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF EXISTS (SELECT FROM unnest(coalesce(p_handles, '{}')) h
                WHERE h IS NULL OR h !~ '^(slack:[A-Z0-9]{1,40}|os:[A-Za-z0-9._$-]{1,64})$') THEN
        RAISE EXCEPTION 'an identity is slack:<Slack user id> or os:<user name>' USING ERRCODE = 'AT400';
    END IF;
END
$$;

-- The API keys that are a person's: those they created or received by rotating one (they hold
-- the secret), and — `named` — every key since rotated from those (a rotation copies the name).
CREATE FUNCTION dsar_keys(p_user uuid)
RETURNS TABLE (id uuid, held boolean)
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    WITH RECURSIVE held(id) AS (
        SELECT (a.detail->>'key_id')::uuid FROM audit_log a
         WHERE a.actor = 'user:' || p_user::text AND a.action = 'key.create' AND a.detail ? 'key_id'
        UNION
        SELECT (a.detail->>'new_key_id')::uuid FROM audit_log a
         WHERE a.actor = 'user:' || p_user::text AND a.action = 'key.rotate'
           AND a.detail ? 'new_key_id'
    ), named(id) AS (
        SELECT id FROM held
        UNION
        SELECT k.replaced_by FROM api_keys k JOIN named n ON k.id = n.id
         WHERE k.replaced_by IS NOT NULL
    )
    SELECT n.id, n.id IN (SELECT id FROM held) FROM named n WHERE n.id IS NOT NULL
$$;

-- The credentials a person wrote last (a later write by someone else makes it theirs).
CREATE FUNCTION dsar_credentials(p_user uuid)
RETURNS TABLE (id uuid)
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT w.id FROM (
        SELECT DISTINCT ON (a.detail->>'credential_id')
               (a.detail->>'credential_id')::uuid AS id, a.actor
          FROM audit_log a
         WHERE a.action = 'credential.write' AND a.detail ? 'credential_id'
         ORDER BY a.detail->>'credential_id', a.id DESC
    ) w
    WHERE w.actor = 'user:' || p_user::text
$$;

-- The audit references that stand for one person: their console user and the subjects named
-- by `p_handles` (`slack:<user id>`, `os:<user name>`).
CREATE FUNCTION dsar_refs(p_user uuid, p_handles text[])
RETURNS TABLE (ref text, subject uuid)
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT 'user:' || p_user::text, NULL::uuid
    UNION ALL
    SELECT 'subject:' || d.id::text, d.id
      FROM data_subjects d
     WHERE d.kind || ':' || d.external_id = ANY (p_handles)
$$;

-- Everything apitree holds about one person, as one document (never a hash or a ciphertext).
-- NULL when there is no such user.
CREATE FUNCTION dsar_export(p_user uuid, p_handles text[])
RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER AS $$
WITH u AS (SELECT * FROM users WHERE id = p_user),
     refs AS (SELECT * FROM dsar_refs(p_user, p_handles)),
     slack_ids AS (SELECT substr(h, 7) AS id FROM unnest(p_handles) h WHERE h LIKE 'slack:%'),
     keys AS (SELECT * FROM dsar_keys(p_user)),
     creds AS (SELECT * FROM dsar_credentials(p_user))
SELECT jsonb_build_object(
    'format', 'apitree.dsar.export/1',
    'generated_at', now(),
    'subject', 'user:' || p_user::text,
    'profile', (SELECT jsonb_build_object(
        'id', u.id, 'email', u.email, 'role', u.role, 'org_id', u.org_id,
        'created_at', u.created_at, 'updated_at', u.updated_at, 'disabled_at', u.disabled_at,
        'has_password', u.password_hash IS NOT NULL,
        'invitation_pending', u.invite_hash IS NOT NULL,
        'invite_expires_at', u.invite_expires_at, 'erased_at', u.erased_at) FROM u),
    'orgs', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', o.id, 'name', o.name, 'role', u.role)), '[]')
               FROM u JOIN orgs o ON o.id = u.org_id),
    'api_keys', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'id', k.id, 'name', k.name, 'prefix', k.prefix, 'scope', k.scope, 'tier', k.tier,
                    'daily_quota', k.daily_quota, 'created_at', k.created_at,
                    'expires_at', k.expires_at, 'grace_until', k.grace_until,
                    'revoked_at', k.revoked_at, 'replaced_by', k.replaced_by,
                    'last_used_at', k.last_used_at,
                    'revoked_on_erasure', (SELECT held FROM keys WHERE keys.id = k.id))
                    ORDER BY k.created_at), '[]')
                   FROM api_keys k WHERE k.id IN (SELECT id FROM keys)),
    'credentials', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'id', c.id, 'name', c.name, 'kind', c.kind, 'api', a.name, 'header', c.header,
                    'sent_to', c.bound_upstream, 'key_version', c.key_version,
                    'created_at', c.created_at, 'updated_at', c.updated_at,
                    'rotated_at', c.rotated_at) ORDER BY c.created_at), '[]')
                   FROM upstream_credentials c JOIN apis a ON a.id = c.api_id
                  WHERE c.id IN (SELECT id FROM creds)),
    'usage', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'api_key_id', uc.api_key_id, 'api_id', uc.api_id,
                    'window_start', uc.window_start, 'requests', uc.requests,
                    'errors', uc.errors, 'bytes_out', uc.bytes_out)
                    ORDER BY uc.window_start, uc.api_key_id), '[]')
                FROM usage_counters uc WHERE uc.api_key_id IN (SELECT id FROM keys WHERE held)),
    'audit', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'id', a.id, 'at', a.at, 'actor', a.actor, 'action', a.action,
                    'target', a.target, 'org_id', a.org_id, 'detail', a.detail) ORDER BY a.id), '[]')
                FROM audit_log a
               WHERE a.actor IN (SELECT ref FROM refs) OR a.target IN (SELECT ref FROM refs)
                  OR a.detail->>'user_id' = p_user::text),
    'credit_ledger', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'id', l.id, 'org_id', l.org_id, 'amount', l.amount, 'reason', l.reason,
                    'at', l.at) ORDER BY l.id), '[]')
                FROM credit_ledger l WHERE l.actor IN (SELECT ref FROM refs)),
    'incidents_acknowledged', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'id', i.id, 'gateway', i.gateway, 'route', i.route, 'signal', i.signal,
                    'acknowledged_by', i.acknowledged_by, 'acknowledged_at', i.acknowledged_at,
                    'opened_at', i.opened_at, 'resolved_at', i.resolved_at) ORDER BY i.opened_at), '[]')
                FROM incidents i
               WHERE i.acknowledged_by IN (SELECT id FROM slack_ids)
                  OR i.acknowledged_by IN (SELECT ref FROM refs)),
    'identities', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'reference', 'subject:' || d.id::text, 'kind', d.kind,
                    'external_id', d.external_id, 'label', d.label,
                    'first_seen', d.first_seen, 'last_seen', d.last_seen) ORDER BY d.first_seen), '[]')
                FROM data_subjects d WHERE d.id IN (SELECT subject FROM refs)),
    'requests', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'id', r.id, 'kind', r.kind, 'state', r.state, 'actor', r.actor,
                    'reason', r.reason, 'at', r.at) ORDER BY r.id), '[]')
                FROM dsar_requests r WHERE r.subject = 'user:' || p_user::text)
)
WHERE EXISTS (SELECT FROM u)
$$;

-- Erases one person: the keys they hold revoked (and every key named after them unnamed), the
-- BYOK credentials they wrote last removed, profile overwritten, the identities in `p_handles`
-- forgotten, their Slack ids scrubbed from incidents and messages. The audit log is not
-- touched (it holds references only); one `dsar.erase` row is appended, naming the identities.
-- Refused (SQLSTATE AT403) for a super_admin or an org's last admin; AT404 when there is no
-- such user, AT409 when already erased, AT400 for a missing reason or a malformed identity.
CREATE FUNCTION dsar_erase(p_user uuid, p_handles text[], p_actor text, p_reason text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    u         users%ROWTYPE;
    ref       text := 'user:' || p_user::text;
    reason    text := regexp_replace(coalesce(p_reason, ''),
                                     '^[[:space:]\u00a0\u2000-\u200b\u3000]+|[[:space:]\u00a0\u2000-\u200b\u3000]+$', '', 'g');
    ids       jsonb;
    n_keys    bigint;
    n_named   bigint;
    n_creds   bigint;
    n_system  bigint;
    n_ids     bigint;
    n_inc     bigint := 0;
    n_out     bigint := 0;
    n_legacy  bigint;
    sid       text;
    report    jsonb;
BEGIN
    IF length(reason) NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'an erasure needs a reason (1 to 1000 characters, not only spaces)'
            USING ERRCODE = 'AT400';
    END IF;
    PERFORM dsar_check_handles(p_handles);
    -- Locked until commit: a console request of this person waits (its principal lookup takes
    -- a share lock), then finds them disabled; none slips a new key past the erasure.
    SELECT * INTO u FROM users WHERE id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'there is no user %', p_user USING ERRCODE = 'AT404';
    END IF;
    IF u.erased_at IS NOT NULL THEN
        RAISE EXCEPTION 'user % was erased at %', p_user, u.erased_at USING ERRCODE = 'AT409';
    END IF;
    IF u.role = 'super_admin' THEN
        RAISE EXCEPTION 'user % is a super_admin: another super_admin changes their role first (console: PUT /api/v1/users/%/role), then erase them'
            , p_user, p_user USING ERRCODE = 'AT403';
    END IF;
    IF u.role = 'admin' AND u.org_id IS NOT NULL THEN
        -- Every admin row of the org, locked: two erasures of its last two admins serialize.
        PERFORM 1 FROM users WHERE org_id = u.org_id AND role = 'admin' FOR UPDATE;
        IF NOT EXISTS (SELECT FROM users
                        WHERE org_id = u.org_id AND role = 'admin' AND id <> p_user
                          AND erased_at IS NULL AND disabled_at IS NULL) THEN
            RAISE EXCEPTION 'user % is the last admin of org %: make another member admin first, then erase'
                , p_user, u.org_id USING ERRCODE = 'AT403';
        END IF;
    END IF;

    WITH k AS (
        UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()), name = ''
         WHERE id IN (SELECT id FROM dsar_keys(p_user) WHERE held)
        RETURNING 1)
    SELECT count(*) INTO n_keys FROM k;
    WITH k AS (
        UPDATE api_keys SET name = ''
         WHERE id IN (SELECT id FROM dsar_keys(p_user) WHERE NOT held) AND name <> ''
        RETURNING 1)
    SELECT count(*) INTO n_named FROM k;
    WITH c AS (
        DELETE FROM upstream_credentials
         WHERE kind = 'byok' AND id IN (SELECT id FROM dsar_credentials(p_user))
        RETURNING 1)
    SELECT count(*) INTO n_creds FROM c;
    -- A seller's system credential is the org's API configuration: kept (and counted).
    SELECT count(*) INTO n_system FROM upstream_credentials
     WHERE kind = 'system' AND id IN (SELECT id FROM dsar_credentials(p_user));
    UPDATE users
       SET email = 'erased-' || p_user::text || '@erased.invalid', password_hash = NULL,
           invite_hash = NULL, invite_expires_at = NULL,
           disabled_at = coalesce(disabled_at, now()), erased_at = now(), updated_at = now()
     WHERE id = p_user;
    -- Rows written before subjects existed still carry names in the chain: counted, kept.
    SELECT count(*) INTO n_legacy FROM audit_log a, unnest(p_handles) h
     WHERE (h LIKE 'slack:%' AND a.actor LIKE 'slack:%(' || substr(h, 7) || ')')
        OR (h LIKE 'os:%' AND (a.actor = h OR a.actor LIKE h || ' (%'));
    -- A Slack id is scrubbed where it stands alone: a mention `<@U…>` or a whole JSON string.
    FOR sid IN SELECT substr(h, 7) FROM unnest(p_handles) h WHERE h LIKE 'slack:%' LOOP
        WITH i AS (
            UPDATE incidents
               SET acknowledged_by = CASE WHEN acknowledged_by = sid THEN 'erased' ELSE acknowledged_by END,
                   last_notice = replace(last_notice::text, '"' || sid || '"', '"erased"')::jsonb
             WHERE acknowledged_by = sid OR position('"' || sid || '"' IN last_notice::text) > 0
            RETURNING 1)
        SELECT n_inc + count(*) INTO n_inc FROM i;
        WITH o AS (
            UPDATE notification_outbox
               SET payload = replace(replace(payload::text, '<@' || sid || '>', '<@erased>'),
                                     '"' || sid || '"', '"erased"')::jsonb
             WHERE position('<@' || sid || '>' IN payload::text) > 0
                OR position('"' || sid || '"' IN payload::text) > 0
            RETURNING 1)
        SELECT n_out + count(*) INTO n_out FROM o;
    END LOOP;
    -- The identities' references, taken before they are forgotten, for the audit row.
    SELECT coalesce(jsonb_agg(r.ref), '[]') INTO ids
      FROM dsar_refs(p_user, p_handles) r WHERE r.subject IS NOT NULL;
    WITH d AS (
        UPDATE data_subjects SET label = NULL, external_id = NULL, erased_at = now()
         WHERE kind || ':' || external_id = ANY (p_handles) RETURNING 1)
    SELECT count(*) INTO n_ids FROM d;

    report := jsonb_build_object(
        'keys_revoked', n_keys, 'keys_unnamed', n_named, 'credentials_removed', n_creds,
        'system_credentials_kept', n_system, 'identities_erased', n_ids,
        'incidents_scrubbed', n_inc, 'messages_scrubbed', n_out,
        'legacy_audit_rows_kept', n_legacy);
    -- The identities are named by reference (their subjects), never by their handle.
    INSERT INTO audit_log (id, actor, action, target, org_id, detail, prev_hash, hash)
    VALUES (0, p_actor, 'dsar.erase', ref, u.org_id,
            jsonb_build_object('user_id', p_user, 'reason', reason, 'identities', ids) || report,
            '', '');
    PERFORM dsar_done(ref, 'erase', 'erased', p_actor, reason, report);
    RETURN report;
END
$$;

REVOKE ALL ON FUNCTION dsar_refs(uuid, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION dsar_export(uuid, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION dsar_erase(uuid, text[], text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dsar_export(uuid, text[]) TO apitree_console;
GRANT EXECUTE ON FUNCTION dsar_erase(uuid, text[], text, text) TO apitree_console;
GRANT SELECT, INSERT ON dsar_requests TO apitree_console;
REVOKE ALL ON FUNCTION dsar_done(text, text, text, text, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dsar_done(text, text, text, text, text, jsonb) TO apitree_console;
-- The audit page shows who a reference stands for (staff only read the audit log).
GRANT SELECT ON data_subjects TO apitree_console;

-- A principal lookup that holds a share lock on the user's row until the request's
-- transaction ends, so an erasure (which locks the row for update) and the person's own
-- requests serialize.
CREATE FUNCTION console_principal_locked(p_id uuid)
RETURNS TABLE (email text, org_id uuid, role user_role, disabled boolean)
LANGUAGE sql VOLATILE SECURITY DEFINER AS $$
    SELECT u.email, u.org_id, u.role, u.disabled_at IS NOT NULL FROM users u WHERE u.id = p_id
       FOR SHARE
$$;
REVOKE ALL ON FUNCTION console_principal_locked(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION console_principal_locked(uuid) TO apitree_console;

-- Every SECURITY DEFINER function of the schema searches the schema first and pg_temp last:
-- otherwise a session's temporary tables (searched first by default) could stand in for the
-- real ones while the function runs as the owner.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.prosecdef AND p.pronamespace = current_schema()::regnamespace
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
        -- Only the roles granted above (and the owner) may call them: a function that runs as
        -- the owner is never everyone's.
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;
