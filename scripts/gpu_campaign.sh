#!/usr/bin/env bash
# The GPU measurement campaign: examples/matrix-quick.toml on one lent H100 or H200, in about 9 minutes
# (first run, 2026-11-26, H200: 34 profiles in 368 s, the whole call 400 s; profiles/h200).
#
# What it does, on the device machine (its image has torch, transformers, accelerate, pandas,
# rich, matplotlib and nvidia-ml-py, but not diffusers):
#   1. installs diffusers and peft from wheels carried in .wheels/ (no network there);
#   2. records nvidia-smi -q and the versions;
#   3. runs `vramplan profile --matrix examples/matrix-quick.toml --check-first` with a time budget
#      that ends the campaign cleanly TRACE_SECONDS before TOTAL_SECONDS (default 540) have passed
#      since the script started -- each case in a fresh forked process, an out-of-memory stored as
#      "does not fit"; if the first case fails the campaign stops there (its whole traceback in
#      the log), so a broken environment costs seconds and leaves the device time for a second try;
#   4. records every allocation of SD 1.5 LoRA and SDXL LoRA steps (scripts/gpu_trace.py) in the
#      TRACE_SECONDS (default 110) kept for them, for finding the layer behind a wrong prediction;
#   5. tars the profiles into $OUT/profiles.tar.gz (the device tool brings back at most 8 files,
#      so the 35 profiles travel as one archive), beside campaign.log, nvidia-smi.txt and the
#      traces.
#
# Prepare once, here (the wheels folder is git-ignored through .git/info/exclude, and travels
# only because the call names it in `carry`):
#     echo /.wheels/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 -d .wheels \
#         diffusers==0.42.1 peft==0.21.2
# (diffusers' other needs -- huggingface-hub >= 1.32, safetensors >= 0.8, regex, requests,
# Pillow, filelock -- are in the image; importlib_metadata is only imported on Python < 3.8.)
#
# The device-tool call (one call; the machine's start, about 8 minutes of campaign and the
# transfers fit the session's 15 minutes of device time once, so give it back afterwards):
#     run(command="bash scripts/gpu_campaign.sh", carry=[".wheels"], timeout_s=600)
# Then, here, with the files it returns under FILES_AT:
#     mkdir -p profiles && tar -xzf FILES_AT/profiles.tar.gz -C profiles
#     vramplan validate --chart accuracy.png --csv accuracy.csv
#
# Variables: TOTAL_SECONDS (default 540), TRACE_SECONDS (default 110; 0: no traces), MATRIX (default examples/matrix-quick.toml),
# OUT (set by the device tool; default out/gpu-campaign when run by hand).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

STARTED=$(date +%s)
TOTAL_SECONDS=${TOTAL_SECONDS:-540}
TRACE_SECONDS=${TRACE_SECONDS:-110}
MATRIX=${MATRIX:-examples/matrix-quick.toml}
OUT=${OUT:-out/gpu-campaign}
PROFILES=${PROFILES:-/tmp/vramplan-profiles}
SITE=/tmp/vramplan-site
TAR_MARGIN=20   # seconds kept for the archive and the summary

elapsed() { echo $(( $(date +%s) - STARTED )); }
say() { echo "[$(elapsed) s] $*"; }

campaign() {

    nvidia-smi -q > "$OUT/nvidia-smi.txt" 2>&1 || say "nvidia-smi -q failed"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,compute_cap --format=csv
    python3 - <<'EOF' || { say "the environment cannot import what vramplan needs"; return 1; }
import importlib.metadata as m, platform
import torch, diffusers, peft, transformers, pynvml  # noqa: F401
import vramplan
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| diffusers", diffusers.__version__, "| peft", peft.__version__,
      "| transformers", transformers.__version__, "| nvidia-ml-py", m.version("nvidia-ml-py"),
      "| vramplan", vramplan.__version__, vramplan.__file__)
EOF

    local budget=$(( TOTAL_SECONDS - $(elapsed) - TRACE_SECONDS - TAR_MARGIN ))
    if (( budget < 60 )); then
        say "only $budget s left for the campaign: not starting it"
        return 1
    fi
    say "campaign $MATRIX, budget $budget s, profiles to $PROFILES"
    # The budget stops the campaign between cases; `timeout` is the backstop for a stuck case
    # (SIGINT: the case in flight is lost, every profile already written stays).
    timeout --signal=INT --kill-after=15 $(( budget + 30 )) \
        python3 -m vramplan profile --matrix "$MATRIX" --out "$PROFILES" --budget "$budget" --check-first
    local code=$?
    say "campaign exit code $code"
    return $code
}

traces() {
    # each trace in its own process, stopped if it would run past the end of the script
    local name left
    for case in "sd15-lora --model sd15 --method lora --precision fp16" \
                "sdxl-lora --model sdxl --method lora --precision bf16 --gradient-checkpointing"; do
        name=${case%% *}
        left=$(( TOTAL_SECONDS - $(elapsed) - TAR_MARGIN ))
        if (( left < 30 )); then
            say "trace $name: only $left s left, not started"
            continue
        fi
        say "trace $name (at most $left s)"
        # shellcheck disable=SC2086
        timeout --signal=INT --kill-after=10 "$left" \
            python3 scripts/gpu_trace.py --out "$OUT/trace-$name.json.gz" ${case#* } \
            || say "trace $name: exit code $?"
    done
}

archive() {
    local count
    count=$(find "$PROFILES" -name '*.json' | wc -l)
    tar -czf "$OUT/profiles.tar.gz" -C "$PROFILES" .
    say "archived $count profiles to $OUT/profiles.tar.gz ($(du -h "$OUT/profiles.tar.gz" | cut -f1))"
}

mkdir -p "$OUT" "$PROFILES"
# The environment is set here, not inside campaign(): a function piped into tee runs in a subshell,
# and the traces after it need the same PYTHONPATH (the first campaign lost its traces to that).
if ls .wheels/*.whl >/dev/null 2>&1; then
    say "installing the carried wheels: $(ls .wheels | tr '\n' ' ')" | tee "$OUT/campaign.log"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .wheels/*.whl || { say "wheel install failed"; exit 1; }
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    say "no .wheels/ here: using what the image has" | tee "$OUT/campaign.log"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
campaign 2>&1 | tee -a "$OUT/campaign.log"
code=${PIPESTATUS[0]}
if (( TRACE_SECONDS > 0 )) && [ -n "$(find "$PROFILES" -name '*.json' -print -quit)" ]; then
    traces 2>&1 | tee -a "$OUT/campaign.log"
fi
archive 2>&1 | tee -a "$OUT/campaign.log"
exit "$code"
