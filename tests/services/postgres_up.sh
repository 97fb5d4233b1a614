#!/usr/bin/env bash
# Start Debian's PostgreSQL 15 cluster (without systemd) and create the test role, idempotently.
# The registry tests create a fresh database per test as this role. Password: $HOLLY_PG_TEST_PASSWORD.
set -euo pipefail
password="${HOLLY_PG_TEST_PASSWORD:-holly-test-pw}"
if ! command -v pg_ctlcluster >/dev/null; then
    apt-get install -y -q postgresql-15 >/dev/null
fi
if ! pg_lsclusters -h | awk '$1 == 15 && $2 == "main" {print $4}' | grep -q online; then
    pg_ctlcluster 15 main start
fi
su postgres -c "psql -v ON_ERROR_STOP=1 -q" <<SQL
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'holly_test') THEN
        CREATE ROLE holly_test LOGIN CREATEDB PASSWORD '${password}';
    ELSE
        ALTER ROLE holly_test LOGIN CREATEDB PASSWORD '${password}';
    END IF;
END
\$\$;
SQL
echo "postgres: cluster 15/main online, role holly_test ready"
