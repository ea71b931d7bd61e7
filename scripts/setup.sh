#!/usr/bin/env bash
# Set up a development checkout: the virtual environment (.venv: CPU torch, then metasent with the
# dev extra) and the system programs the tests use: Debian's chromium (the playground's browser
# test), nginx-light (the load-balancer tests) and a PostgreSQL server at 127.0.0.1:5432 with a
# database `test` (the store tests run on SQLite and PostgreSQL). System packages are installed
# with apt-get when missing, which needs root; without root the script says what is missing.
# Safe to run again: it installs only what is not there.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

# Python: the CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build), then
# metasent with the service, training, bulk, test, lint and docs tools.
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'

missing=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
have chromium || missing+=(chromium)
have nginx || missing+=(nginx-light)
pg_up() { command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; }
pg_was_up=0
pg_up && pg_was_up=1
[ "$pg_was_up" -eq 1 ] || [ -d /usr/lib/postgresql ] || missing+=(postgresql)

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: not root, so not installing ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}'" >&2
    exit 1
  fi
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
fi

# PostgreSQL: use the server that answered at 127.0.0.1:5432 before this script ran, else configure
# Debian's cluster (listen on 127.0.0.1, trust auth), (re)start it and create the database `test`
# (METASENT_TEST_POSTGRES_URL points the tests at another server).
if [ -z "${METASENT_TEST_POSTGRES_URL:-}" ] && [ "$pg_was_up" -eq 0 ]; then
  version=$(ls /usr/lib/postgresql | sort -V | tail -1)
  pg_conftool "$version" main set listen_addresses 127.0.0.1
  sed -i -E 's/^(local|host)(.*)(peer|scram-sha-256|md5)$/\1\2trust/' "/etc/postgresql/$version/main/pg_hba.conf"
  pg_ctlcluster "$version" main start || pg_ctlcluster "$version" main restart
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  pg_up || { echo "setup: PostgreSQL did not start at 127.0.0.1:5432" >&2; exit 1; }
  psql -h 127.0.0.1 -U postgres -tc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test"
fi
echo "setup: done (.venv, chromium, nginx, PostgreSQL)"
