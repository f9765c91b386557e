#!/usr/bin/env bash
# The PostgreSQL server binaries the storage tests start a throwaway server from (Debian's
# package: /usr/lib/postgresql/*/bin/initdb and pg_ctl; tests/pg_server.py finds them and runs
# the server as the `postgres` user when CI runs as root). The package's own cluster is not
# used; stop it so nothing listens on 5432. With CI=true, the tests fail if no server starts.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi
if command -v pg_ctlcluster >/dev/null 2>&1; then
  for cluster in $(pg_lsclusters -h 2>/dev/null | awk '{print $1 "/" $2}'); do
    pg_ctlcluster "${cluster%/*}" "${cluster#*/}" stop 2>/dev/null || true
  done
fi
ls /usr/lib/postgresql/*/bin/initdb
