#!/usr/bin/env bash
# Every check: lint, type-check, the docs site, the test suite (unit tests on a tiny BERT, then the
# slow ones on all-MiniLM-L6-v2 and the ARSC data; nothing skips), then the deployment checks: the
# compose file against the compose-spec schema, and the Docker image's install and start steps
# (scripts/install.sh, metasent serve, the healthcheck) in a fresh virtual environment (the
# Docker build itself needs a Docker engine). Run scripts/setup.sh first. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

lint_paths=(app meta data metasent/*.py setup.py bench tests)
.venv/bin/ruff check "${lint_paths[@]}"
.venv/bin/ruff format --check "${lint_paths[@]}"
.venv/bin/mypy -p metasent
.venv/bin/mypy bench
.venv/bin/hadolint Dockerfile  # fails on any finding, info included
.venv/bin/mkdocs build --strict --quiet

.venv/bin/python -m pytest "$@"

.venv/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
image_env=$(mktemp -d)
python3 -m venv "$image_env/venv"
PYTHON="$image_env/venv/bin/python" bash scripts/install.sh . > "$image_env/install.log" 2>&1 \
  || { tail -30 "$image_env/install.log"; exit 1; }
# the image holds the service only: not the training-only datasets, no bench package and no
# generic top-level name (run outside the checkout, so the repository is not on sys.path)
(cd "$image_env" && "$image_env/venv/bin/python" -c "import importlib.util as u, sys; extra = [m for m in ('datasets', \
'bench', 'app', 'meta', 'data') if u.find_spec(m)]; sys.exit(f'image installs {extra}' if extra else 0)")
(cd "$image_env" && METASENT_PORT=8797 exec "$image_env/venv/bin/metasent" serve --port 8797) &
server=$!
for _ in $(seq 1 180); do
  METASENT_PORT=8797 "$image_env/venv/bin/python" scripts/healthcheck.py && break
  kill -0 "$server" 2>/dev/null || break
  sleep 1
done
status=0
METASENT_PORT=8797 "$image_env/venv/bin/python" scripts/healthcheck.py || status=$?
kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true
[ "$status" -eq 0 ] && echo "image install and start: healthy" || { echo "image install and start: unhealthy"; exit 1; }
