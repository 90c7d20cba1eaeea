-- Guantong ingest, schema version 1. Applied by `guantong-ingest migrate`
-- in one transaction; tables are created in the first schema of the
-- connection's search_path. Sequence numbers, buffer ids and series ids are
-- unsigned 64-bit numbers stored bit for bit in bigint columns.

-- Grows after every committed change a report reads (`Store::generation`).
CREATE SEQUENCE generation;

-- Ingest's own secrets shared by every replica: the daily digest key.
CREATE TABLE ingest_keys (
    name text PRIMARY KEY,
    secret bytea NOT NULL
);

CREATE TABLE gateways (
    id text PRIMARY KEY,
    -- salted token hash, previous token of a rotation, bound key
    record jsonb NOT NULL,
    registered_at_ms bigint NOT NULL
);

-- One row per stream (gateway, buffer); locked FOR UPDATE by every
-- transaction that stores a batch of it, so replicas take turns per stream.
CREATE TABLE streams (
    gateway text NOT NULL,
    buffer_id bigint NOT NULL,
    -- stored sequence ranges (`SeqRanges`)
    ranges bytea NOT NULL,
    PRIMARY KEY (gateway, buffer_id)
) WITH (fillfactor = 50);

-- Every stored batch, once: the constraint is exactly-once across replicas.
-- Batches that are links of the gateway's evidence chain keep their signed
-- bytes.
CREATE TABLE batches (
    gateway text NOT NULL,
    buffer_id bigint NOT NULL,
    seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    received_at_ms bigint NOT NULL,
    payload bytea,
    prev_hash bytea,
    signature bytea,
    effective_hash bytea,
    signature_ok boolean,
    signature_checked boolean,
    algorithm integer,
    PRIMARY KEY (gateway, buffer_id, seq)
);

CREATE TABLE chain_state (
    gateway text NOT NULL,
    buffer_id bigint NOT NULL,
    state jsonb NOT NULL,
    PRIMARY KEY (gateway, buffer_id)
) WITH (fillfactor = 50);

CREATE TABLE chain_breaks (
    gateway text NOT NULL,
    buffer_id bigint NOT NULL,
    seq bigint NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (gateway, buffer_id, seq)
);

CREATE TABLE losses (
    gateway text NOT NULL,
    buffer_id bigint NOT NULL,
    first_seq bigint NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (gateway, buffer_id, first_seq)
);

CREATE TABLE manifests (
    gateway text NOT NULL,
    version bigint NOT NULL,
    manifest bytea NOT NULL,
    PRIMARY KEY (gateway, version)
);

CREATE TABLE series (
    id bigserial PRIMARY KEY,
    gateway text NOT NULL,
    device text NOT NULL,
    tag text NOT NULL,
    meta jsonb NOT NULL,
    -- running totals and the latest point (`SeriesState`, protobuf)
    state bytea,
    UNIQUE (gateway, device, tag)
) WITH (fillfactor = 50);

-- One row per point, partitioned by source time into daily (UTC+8)
-- partitions `points_YYYYMMDD`, made by ingest (`postgres::partitions`);
-- there is no default partition, so retention drops whole days.
-- value: kind 0 none, 1 bool, 2 int, 3 uint, 4 double, 5 string; `num`
-- holds every numeric value as a double for tools that read the table.
CREATE TABLE points (
    series bigint NOT NULL,
    time_ms bigint NOT NULL,
    quality integer NOT NULL,
    quality_code bigint NOT NULL,
    kind smallint NOT NULL,
    num double precision,
    bits bigint,
    txt text,
    server_delta_ms bigint,
    received_at_ms bigint NOT NULL,
    backfill boolean NOT NULL,
    buffer_id bigint NOT NULL,
    seq bigint NOT NULL
) PARTITION BY RANGE (time_ms);
CREATE INDEX points_series_time ON points (series, time_ms);

-- Points with an earlier source time were dropped by retention (their
-- partitions); rollups, batches, losses and the chain are kept. No row: none.
CREATE TABLE points_horizon (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    from_ms bigint NOT NULL
);

-- Rollups (`store::rollup`), written in the transaction of their points.
-- Tables whose rows every batch updates in place keep half of each page
-- free (fillfactor 50), so an update fits beside its row and writes no
-- index entry (a HOT update).
CREATE TABLE minutes (
    series bigint NOT NULL,
    minute bigint NOT NULL,
    good bigint NOT NULL,
    uncertain bigint NOT NULL,
    bad bigint NOT NULL,
    PRIMARY KEY (series, minute)
) WITH (fillfactor = 50);
CREATE TABLE series_days (
    series bigint NOT NULL,
    day bigint NOT NULL,
    row bytea NOT NULL,
    PRIMARY KEY (series, day)
) WITH (fillfactor = 50);
CREATE TABLE series_hours (
    series bigint NOT NULL,
    hour bigint NOT NULL,
    n bigint NOT NULL,
    sum double precision NOT NULL,
    min double precision NOT NULL,
    max double precision NOT NULL,
    PRIMARY KEY (series, hour)
) WITH (fillfactor = 50);
CREATE TABLE series_runs (
    series bigint NOT NULL,
    kind smallint NOT NULL,
    start_ms bigint NOT NULL,
    end_ms bigint NOT NULL,
    PRIMARY KEY (series, kind, start_ms)
) WITH (fillfactor = 50);
CREATE TABLE gateway_days (
    gateway text NOT NULL,
    day bigint NOT NULL,
    row bytea NOT NULL,
    PRIMARY KEY (gateway, day)
) WITH (fillfactor = 50);

-- Registry.
CREATE TABLE enterprises (
    code text PRIMARY KEY,
    provider text NOT NULL,
    record jsonb NOT NULL
);
CREATE INDEX enterprises_provider ON enterprises (provider);
CREATE TABLE equipment (
    code text NOT NULL REFERENCES enterprises (code),
    id text NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (code, id)
);
CREATE TABLE owners (
    gateway text PRIMARY KEY REFERENCES gateways (id),
    code text NOT NULL REFERENCES enterprises (code)
);
CREATE INDEX owners_code ON owners (code);
CREATE TABLE accounts (
    name text PRIMARY KEY,
    token_sha256 bytea NOT NULL UNIQUE,
    record jsonb NOT NULL
);
CREATE TABLE access_log (
    id bigserial PRIMARY KEY,
    at_ms bigint NOT NULL,
    record jsonb NOT NULL
);
CREATE INDEX access_log_at ON access_log (at_ms, id);
CREATE TABLE gateway_configs (
    gateway text NOT NULL REFERENCES gateways (id),
    version bigint NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (gateway, version)
);
CREATE TABLE gateway_config_states (
    gateway text PRIMARY KEY,
    state jsonb NOT NULL
);

-- Gateway certificates revoked by `ca revoke --database` (`crate::ca`):
-- every replica refuses them at the next stream.
CREATE TABLE revoked_certificates (
    serial text PRIMARY KEY,
    gateway text NOT NULL,
    revoked_at_ms bigint NOT NULL
);
