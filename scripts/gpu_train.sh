#!/usr/bin/env bash
# `vramplan train` on CUDA, end to end, on one lent H100 or H200: issue 5's last open check.
# Run on a lent H200 on 2026-11-26 (three calls, 212 + 316 + 85 s; the results are in README.md,
# "fit and train"); dry-run on the CPU with TINY=1 DEVICE=cpu (see below).
#
# What it does, on the device machine (its image has torch, transformers, accelerate, pandas,
# rich, matplotlib and nvidia-ml-py, but not diffusers nor peft: those come from .wheels/, as
# for scripts/gpu_campaign.sh):
#   1. writes a full-size Stable Diffusion 1.5 pipeline with random weights and 8 captioned
#      512 px images (scripts/make_random_pipeline.py: the catalog's configs, no hub download),
#      so that the plans are the catalog's and their estimates are what `vramplan fit` says;
#   2. trains, each case in its own process under a time limit, from a plan written by `vramplan
#      fit --json` (tight cards, so the plans use the memory tricks) or `estimate --json`:
#        lora-8gb   fit --method lora --gpu 8GB          STEPS steps, a checkpoint every STEPS/3
#        resume     the same plan, killed (SIGKILL) once its first checkpoint is written, then
#                   --resume to STEPS: the run must end with STEPS steps done
#        ti         estimate --method textual-inversion  STEPS steps
#        db-24gb    fit --method dreambooth --gpu 24GB   STEPS/3 steps, class images
#        full-bf16  estimate --method full --precision bf16 --gradient-checkpointing  STEPS/3 steps
#        int8-adam8 estimate --method lora --base-quant int8 --optimizer adamw8bit     STEPS/3 steps
#        nf4        estimate --method lora --base-quant nf4                             STEPS/3 steps
#        sdxl-12gb  fit --model sdxl --method lora --gpu 12GB, on a random SDXL pipeline (1024 px)
#                   STEPS/3 steps
#      each prints the predicted peak (the plan's estimate) beside torch.cuda.max_memory_allocated
#      and stores the run as a profile under ./profiles/ (train's store_profile);
#   3. loads the LoRA (load_lora_weights) and the embedding (load_textual_inversion) into a
#      StableDiffusionPipeline on the device and checks each changes a 2-step 256 px image;
#   4. leaves in $OUT: train.log (everything, with `say` time stamps), summary.json (per case:
#      exit code, seconds, predicted and measured peak, steps done) and profiles.tar.gz.
#
# Prepare once, here, as for gpu_campaign.sh (the wheels travel because the call names them):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 -d .wheels diffusers==0.42.1 peft==0.21.2
# and bitsandbytes for the int8 / NF4 / 8-bit Adam cases (the device image has none), its wheel
# (manylinux_2_24, 43 MB) repacked without the libraries for other CUDA and ROCm versions, to 7 MB:
#     pip download ... --platform manylinux_2_24_x86_64 -d /tmp/bnb bitsandbytes==0.50.2; unzip it,
#     keep libbitsandbytes_cpu/cuda130/cuda132.so, zip it again into .wheels/ under the same name
# The device-tool call (the seven default cases take about 5 minutes on an H200, CASES=sdxl-12gb
# alone 85 s; give the machine back afterwards):
#     run(command="bash scripts/gpu_train.sh", carry=[".wheels"], timeout_s=540)
# Dry run on a CPU, the same commands on examples/make_tiny_pipeline.py's pipeline (TINY=1: plans
# made for that folder; a full-size SD 1.5 step takes minutes on two cores):
#     TINY=1 DEVICE=cpu STEPS=3 OUT=/tmp/gpu-train bash scripts/gpu_train.sh
#
# Variables: CASES (which cases, in order; default all but the SDXL one: "lora-8gb resume ti
# db-24gb full-bf16 int8-adam8 nf4"; add sdxl-12gb for SDXL), STEPS (default 30), SIZE (image side, default 512), DEVICE (default cuda), TINY (1: the tiny pipeline),
# CASE_SECONDS (each case's limit, default 150), TOTAL_SECONDS (default 500: no case starts
# after), WORK (default /tmp/vramplan-train), OUT (set by the device tool).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
STARTED=$(date +%s)
STEPS=${STEPS:-30}
SIZE=${SIZE:-512}
DEVICE=${DEVICE:-cuda}
CASE_SECONDS=${CASE_SECONDS:-150}
TOTAL_SECONDS=${TOTAL_SECONDS:-500}
WORK=${WORK:-/tmp/vramplan-train}
OUT=${OUT:-out/gpu-train}
SITE=/tmp/vramplan-site
CASES=${CASES:-lora-8gb resume ti db-24gb full-bf16 int8-adam8 nf4}
EVERY=$(( STEPS / 3 > 0 ? STEPS / 3 : 1 ))
SHORT=$(( STEPS / 3 > 0 ? STEPS / 3 : 1 ))

elapsed() { echo $(( $(date +%s) - STARTED )); }
say() { echo "[$(elapsed) s] $*"; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/train.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

if ls .wheels/*.whl >/dev/null 2>&1; then
    say "installing the carried wheels: $(ls .wheels | tr '\n' ' ')"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .wheels/*.whl || { say "wheel install failed"; exit 1; }
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    say "no .wheels/ here: using what the environment has"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 COLUMNS=160
VP="python3 -m vramplan"

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>/dev/null \
    || say "no nvidia-smi"
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'| diffusers', diffusers.__version__, '| peft', peft.__version__)" || { say "imports failed"; exit 1; }

rm -rf "$WORK" && mkdir -p "$WORK/profiles" && cd "$WORK" || exit 1
if [ "${TINY:-0}" = 1 ]; then
    say "writing the tiny pipeline and images"
    python3 "$REPO/examples/make_tiny_pipeline.py" "$WORK/data" || { say "no pipeline"; exit 1; }
    PLAN_MODEL=$WORK/data/model
elif [ "$CASES" = sdxl-12gb ]; then
    PLAN_MODEL=sd15    # SDXL alone: no SD 1.5 pipeline needed
else
    say "writing a random SD 1.5 pipeline and images ($SIZE px)"
    python3 "$REPO/scripts/make_random_pipeline.py" "$WORK/data" --images 8 --size "$SIZE" --device "$DEVICE" \
        || { say "no pipeline"; exit 1; }
    PLAN_MODEL=sd15
fi
MODEL=$WORK/data/model
IMAGES=$WORK/data/images

SUMMARY="$OUT/summary.jsonl"
: > "$SUMMARY"

# run_case NAME PLAN_COMMAND -- TRAIN_OPTIONS: plan, train under the limits, one summary line
run_case() {
    local name=$1 plan_cmd=$2; shift 3
    local left=$(( TOTAL_SECONDS - $(elapsed) ))
    if (( left < 40 )); then say "$name: only $left s left, not started"; return; fi
    local limit=$(( CASE_SECONDS < left ? CASE_SECONDS : left ))
    say "$name: plan: vramplan $plan_cmd"
    # shellcheck disable=SC2086
    $VP $plan_cmd --json > "$WORK/$name-plan.json" || { say "$name: no plan"; echo "{\"case\": \"$name\", \"error\": \"plan\"}" >> "$SUMMARY"; return; }
    local start=$(date +%s)
    say "$name: train $* (at most $limit s)"
    timeout --signal=INT --kill-after=10 "$limit" \
        $VP train --plan "$WORK/$name-plan.json" --model "${CASE_MODEL:-$MODEL}" --data "${CASE_IMAGES:-$IMAGES}" \
        --output "$WORK/run-$name" \
        --device "$DEVICE" "$@"
    local code=$?
    record "$name" "$code" $(( $(date +%s) - start ))
}

# record NAME CODE SECONDS: the plan's prediction, the run file's steps, the newest stored profile
record() {
    python3 - "$@" <<'EOF' >> "$SUMMARY"
import json, sys
from pathlib import Path
name, code, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
work = Path.cwd()
line = {"case": name, "exit_code": code, "seconds": seconds}
try:
    from vramplan.estimate import estimate
    from vramplan.spec import spec_from_json
    plan = json.loads((work / f"{name}-plan.json").read_text())
    line["predicted_peak_allocated_bytes"] = estimate(spec_from_json(plan.get("spec", plan))).footprint.peak_allocated_bytes
except Exception as error:
    line["prediction_error"] = repr(error)
run = work / f"run-{name}" / "vramplan-run.json"
if run.is_file():
    info = json.loads(run.read_text())
    line.update(status=info.get("status"), steps_done=info.get("steps_done"), files=info.get("files"))
profiles = sorted((work / "profiles").rglob("*.json"), key=lambda p: p.stat().st_mtime)
if profiles and profiles[-1].stat().st_mtime >= (run.stat().st_mtime - 600 if run.is_file() else 0):
    profile = json.loads(profiles[-1].read_text())
    line.update(profile=str(profiles[-1].relative_to(work)), measured_peak_allocated_bytes=profile.get("peak_allocated_bytes"),
                measured_peak_reserved_bytes=profile.get("peak_reserved_bytes"),
                measured_load_peak_allocated_bytes=next((p["peak_allocated_bytes"] for p in profile.get("phases", ())
                                                         if p.get("phase") == "load"), None))
    if line.get("predicted_peak_allocated_bytes") and line.get("measured_peak_allocated_bytes"):
        line["error"] = round(line["predicted_peak_allocated_bytes"] / line["measured_peak_allocated_bytes"] - 1, 4)
print(json.dumps(line))
EOF
    say "$1: exit code $2 in $3 s: $(tail -1 "$SUMMARY")"
}

wants() { [[ " $CASES " == *" $1 "* ]]; }

wants lora-8gb && run_case lora-8gb "fit --model $PLAN_MODEL --method lora --gpu 8GB" -- --steps "$STEPS" --checkpoint-every "$EVERY"

# resume: killed once the first checkpoint is on disk, then continued
if wants resume && (( TOTAL_SECONDS - $(elapsed) > 60 )); then
    say "resume: a run killed after its first checkpoint"
    cp "$WORK/lora-8gb-plan.json" "$WORK/resume-plan.json" 2>/dev/null \
        || $VP fit --model "$PLAN_MODEL" --method lora --gpu 8GB --json > "$WORK/resume-plan.json"
    $VP train --plan "$WORK/resume-plan.json" --model "$MODEL" --data "$IMAGES" --output "$WORK/run-resume" \
        --device "$DEVICE" --steps "$STEPS" --checkpoint-every "$EVERY" --quiet &
    pid=$!
    for _ in $(seq 1 $(( CASE_SECONDS * 2 ))); do
        if compgen -G "$WORK/run-resume/checkpoint-*" > /dev/null || ! kill -0 "$pid" 2>/dev/null; then break; fi
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    say "resume: killed; checkpoints: $(ls "$WORK/run-resume" 2>/dev/null | tr '\n' ' ')"
    start=$(date +%s)
    timeout --signal=INT --kill-after=10 "$CASE_SECONDS" \
        $VP train --plan "$WORK/resume-plan.json" --model "$MODEL" --data "$IMAGES" --output "$WORK/run-resume" \
        --device "$DEVICE" --steps "$STEPS" --checkpoint-every "$EVERY" --resume
    record resume $? $(( $(date +%s) - start ))
fi

wants ti && run_case ti "estimate --model $PLAN_MODEL --method textual-inversion" -- --steps "$STEPS" --checkpoint-every 0
wants db-24gb && run_case db-24gb "fit --model $PLAN_MODEL --method dreambooth --gpu 24GB" -- --steps "$SHORT" --checkpoint-every 0 \
    --class-data "$IMAGES" --class-prompt "a shape" --instance-prompt "a sks shape"
wants full-bf16 && run_case full-bf16 "estimate --model $PLAN_MODEL --method full --precision bf16 --gradient-checkpointing" -- \
    --steps "$SHORT" --checkpoint-every 0

wants int8-adam8 && run_case int8-adam8 "estimate --model $PLAN_MODEL --method lora --base-quant int8 --optimizer adamw8bit" -- \
    --steps "$SHORT" --checkpoint-every 0
wants nf4 && run_case nf4 "estimate --model $PLAN_MODEL --method lora --base-quant nf4" -- --steps "$SHORT" --checkpoint-every 0
if wants sdxl-12gb && (( TOTAL_SECONDS - $(elapsed) > 120 )); then
    if [ "${TINY:-0}" = 1 ]; then
        say "sdxl-12gb: no tiny SDXL pipeline here; skipped"
    else
        say "writing a random SDXL pipeline and images (1024 px)"
        if python3 "$REPO/scripts/make_random_pipeline.py" "$WORK/xl" --model sdxl --images 4 --size 1024 \
                --device "$DEVICE"; then
            CASE_MODEL=$WORK/xl/model CASE_IMAGES=$WORK/xl/images \
                run_case sdxl-12gb "fit --model sdxl --method lora --gpu 12GB" -- --steps "$SHORT" --checkpoint-every 0
        else
            say "sdxl-12gb: no pipeline"
        fi
    fi
fi

say "loading the LoRA and the embedding into a pipeline"
if [ -d "$MODEL" ]; then
timeout 120 python3 - "$MODEL" "$WORK" "$DEVICE" <<'EOF'
import sys
from pathlib import Path
import torch
from diffusers import StableDiffusionPipeline
model, work, device = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
dtype = torch.float16 if device == "cuda" else torch.float32
def image(pipe, prompt):
    g = torch.Generator(device="cpu").manual_seed(0)
    side = 64 if pipe.unet.config.sample_size <= 8 else 256     # the tiny pipeline's, or 256 px
    return pipe(prompt, num_inference_steps=2, height=side, width=side, generator=g, output_type="pt").images
pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True).to(device)
before = image(pipe, "a red square")
lora = work / "run-lora-8gb" / "pytorch_lora_weights.safetensors"
if lora.is_file():
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    print("lora", lora.name, "changes the image by", float((image(pipe, "a red square") - before).abs().mean()))
    pipe.unload_lora_weights()
emb = work / "run-ti" / "learned_embeds.safetensors"
if emb.is_file():
    pipe.load_textual_inversion(str(emb), token="<sks>")
    print("embedding", emb.name, "changes the image by",
          float((image(pipe, "a <sks> square") - image(pipe, "a square")).abs().mean()))
EOF
say "loading: exit code $?"
else
    say "loading: no SD 1.5 pipeline here, skipped"
fi

tar -czf "$OUT/profiles.tar.gz" -C "$WORK" profiles
cp "$WORK"/*-plan.json "$OUT/" 2>/dev/null
python3 -c "import json,sys; json.dump([json.loads(l) for l in open(sys.argv[1]) if l.strip()], open(sys.argv[2],'w'), indent=1)" \
    "$SUMMARY" "$OUT/summary.json" && rm -f "$SUMMARY"
say "done: $(ls "$OUT" | tr '\n' ' ')"
