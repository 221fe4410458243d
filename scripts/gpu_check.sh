#!/usr/bin/env bash
# One prepared GPU check (scripts/README.md): ZeRO-2/3 end to end through Lightning, a 7B
# block-diffusion training step, decoding speed, sdpa vs flex_attention. One JSON per part in
# $OUT (default ./gpu_check_out); exit status 1 when any part failed.
#
#   bash scripts/gpu_check.sh            # on a CUDA machine (one H200: about 5 of its 8 minutes)
#   bash scripts/gpu_check.sh --cpu      # dry run of every code path on tiny shapes (tests)
#   bash scripts/gpu_check.sh --parts decode,attention --budget 200
#
# Steps: 1. install the wheels carried in .whl/ into $GPU_CHECK_SITE (default
# /tmp/gpu_check_site) and put it on PYTHONPATH, when .whl/ holds any and a module they carry
# is missing (not with --cpu: they are built for the device's Python 3.12); 2. import every
# module the parts need (one line naming a missing one, exit 1); 3. scripts/gpu_check.py runs
# the parts, each in its own subprocess under its own timeout.
# Other options go to scripts/gpu_check.py (--out, --work, --keep-work, --parts, --budget).
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1

cpu=0
for arg in "$@"; do
    [[ $arg == --cpu ]] && cpu=1
done

# The repo's venv where there is one (here); the device's python3 (which has torch) otherwise.
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
export OUT=${OUT:-$root/gpu_check_out}

# Installed only where a package they carry is missing (the device's image lacks them all; a
# full venv, e.g. here, has them): a quick look that imports nothing.
missing=$("$PYTHON" -c 'import importlib.util as u
print(" ".join(m for m in ("hydra", "omegaconf", "antlr4", "deepspeed", "pydantic", "hjson")
               if u.find_spec(m) is None))')
wheels=(.whl/*.whl)
if [[ $cpu == 0 && -n $missing && -e ${wheels[0]} ]]; then
    site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    echo "gpu_check: installing ${#wheels[@]} wheels from .whl/ into $site"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${wheels[@]}"; then
        echo "gpu_check: installing the wheels in .whl/ failed (see pip's message above)" >&2
        exit 1
    fi
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

check=(--check-imports)
[[ $cpu == 1 ]] && check+=(--cpu)
"$PYTHON" scripts/gpu_check.py "${check[@]}" || exit 1

exec "$PYTHON" scripts/gpu_check.py "$@"
