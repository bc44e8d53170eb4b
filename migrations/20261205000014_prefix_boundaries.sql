-- Path prefixes across orgs, held by the database for every writer, not only the console: an
-- API whose prefix one request path could match together with another org's API would take
-- that seller's traffic (and its buyers' bodies). The rule is the console's
-- (`console_prefix_overlaps`, under the same lock): another org's overlapping prefix, the same
-- prefix twice, or `/` (which overlaps everything) is refused. Nesting within one org is
-- allowed. Checked when a prefix or owner is written, so rows from before this rule (which
-- the gateway routes by longest prefix) stay updatable until someone moves them.
CREATE FUNCTION apis_prefix_boundary() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    taken record;
BEGIN
    -- The check reads other orgs' APIs after taking the registration lock; only a READ
    -- COMMITTED statement sees a registration committed while it waited. A transaction with
    -- an older snapshot (REPEATABLE READ, SERIALIZABLE) would miss it and both would win.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'register or move an API in a READ COMMITTED transaction (this one is %): the prefix check must see registrations committed while it waited for the lock',
                current_setting('transaction_isolation')
            USING ERRCODE = 'check_violation', CONSTRAINT = 'apis_prefix_boundary';
    END IF;
    IF NEW.path_prefix = '/' THEN
        RAISE EXCEPTION 'path_prefix / would match every path; choose one like /%/', NEW.name
            USING ERRCODE = 'check_violation', CONSTRAINT = 'apis_prefix_boundary';
    END IF;
    SELECT o.name, o.path_prefix INTO taken
      FROM console_prefix_overlaps(NEW.path_prefix, NEW.id) o
     WHERE o.org_id <> NEW.org_id OR o.path_prefix = NEW.path_prefix
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'path_prefix % overlaps % of API %, which another org owns or which has the same prefix; choose a prefix no other seller''s API matches',
                NEW.path_prefix, taken.path_prefix, taken.name
            USING ERRCODE = 'check_violation', CONSTRAINT = 'apis_prefix_boundary';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER apis_prefix_boundary
    BEFORE INSERT OR UPDATE OF path_prefix, org_id ON apis
    FOR EACH ROW EXECUTE FUNCTION apis_prefix_boundary();
