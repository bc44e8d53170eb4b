-- Orgs are the tenants; users belong to one org with one role.
CREATE TYPE user_role AS ENUM ('buyer', 'seller', 'admin', 'super_admin');

CREATE TABLE orgs (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    email       text NOT NULL CHECK (position('@' IN email) > 1),
    role        user_role NOT NULL DEFAULT 'buyer',
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, email)
);
CREATE INDEX users_org_id_idx ON users (org_id);
