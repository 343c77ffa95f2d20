#!/usr/bin/env bash
# The one prepared device check for tether's GPU path: install, the device-capable tests on CUDA,
# then benchmarks/gpu_step.py; every log and the results land under $OUT. One call, at most
# 8 minutes (DEVICE_CHECK_BUDGET, seconds, default 470), each stage under its own timeout.
#
#   benchmarks/device_check.sh --fetch-wheels   # here, once: TRL 1.16's wheels into .whl/ (1.8 MB)
#   benchmarks/device_check.sh --cpu            # here: the same flow on the CPU, tiny shapes
#   benchmarks/device_check.sh                  # on the device machine
#
# The device call (the `run` tool), from the checkout the session was started in, with this
# branch in it and .whl/ filled by --fetch-wheels (.whl/ is git-ignored, so it is carried):
#
#   command:   bash benchmarks/device_check.sh
#   carry:     [".whl"]
#   timeout_s: 540
#
# What travels: the tracked tree (~1.3 MB) and .whl/ (~1.8 MB), far under the 64 MiB limit.
# The device machine has torch, transformers, peft and accelerate but not trl or datasets
# (nor dill, multiprocess): those travel as wheels and are installed with --target, never
# over its own packages. tether is installed there with --no-deps: none of its offline extras
# (the embedded SmolLM2, the classifiers, the datasets) are needed by the GPU path.
#
# What comes back (8 files, the most a call returns): env.txt, install.log, tests.log,
# tests-broad.log, gpu_step.log, gpu_step.json, flan-t5.log, summary.txt. The exit status is
# non-zero when the device tests or the benchmark failed; summary.txt says which stage.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

MODE=gpu
case "${1:-}" in
    "") ;;
    --cpu) MODE=cpu ;;
    --fetch-wheels)
        # pure-Python wheels for the device's Python 3.12, as /work/.library/device/README.md says
        exec "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
        ;;
    *) echo "usage: $0 [--cpu | --fetch-wheels]" >&2; exit 2 ;;
esac

START=$SECONDS
BUDGET=${DEVICE_CHECK_BUDGET:-470}
left() { echo $((BUDGET - (SECONDS - START))); }
at_least5() { echo $(($1 > 5 ? $1 : 5)); }  # a timeout of what is left, never <= 0
OUT=${OUT:-$ROOT/runs/device-check}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
    if [ "$MODE" = cpu ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python
    else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_DISABLED=true TQDM_DISABLE=1
[ "$MODE" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
status=0
note() { echo "$*" | tee -a "$SUMMARY"; }
note "device_check ($MODE) $(date -Is) in $ROOT, budget ${BUDGET}s"

# 1. what the machine has --------------------------------------------------------------------
{
    uname -a
    nvidia-smi 2>&1 | head -20 || true
    "$PYTHON" - <<'EOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "setuptools"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} >"$OUT/env.txt" 2>&1
note "env: $(grep -E '^(torch|transformers|peft|cuda) ' "$OUT/env.txt" | tr '\n' ';')"
if [ "$MODE" = gpu ] && ! grep -q '^cuda True' "$OUT/env.txt"; then
    note "FAIL: no CUDA device seen by $PYTHON"; exit 1
fi

# 2. install: the carried wheels and tether itself, into a folder of their own ----------------
SITE=$(mktemp -d /tmp/tether-site.XXXX)
{
    if compgen -G ".whl/*.whl" >/dev/null; then
        # --cpu: installed for the device's Python 3.12 (to check the set installs) but not put
        # on the path: this machine's environment has its own trl and datasets
        py312=()
        [ "$MODE" = cpu ] && py312=(--python-version 3.12 --only-binary=:all:)
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            "${py312[@]}" --target "$SITE/wheels" .whl/*.whl \
            && echo "wheels: $(ls .whl | tr '\n' ' ')"
        [ "$MODE" = cpu ] && mv "$SITE/wheels" "$SITE/wheels-py312"
    else
        echo "no .whl/ here (benchmarks/device_check.sh --fetch-wheels): TRL runs only if installed"
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target "$SITE/tether" . && echo "tether installed (--no-deps) into $SITE/tether"
} >"$OUT/install.log" 2>&1
if [ -d "$SITE/tether/tether" ]; then TETHER_PATH=$SITE/tether; else TETHER_PATH=$ROOT/src; fi
export PYTHONPATH=$TETHER_PATH:$SITE/wheels${PYTHONPATH:+:$PYTHONPATH}
if "$PYTHON" -c "import tether, tether.trainer, tether.cli; print('tether from', tether.__file__)" \
    >>"$OUT/install.log" 2>&1; then
    note "install: ok ($(tail -1 "$OUT/install.log"))"
else
    note "FAIL: tether does not import; see install.log"; exit 1
fi

# 3. the device-capable tests (pytest -m device), on CUDA where there is one ------------------
files=$(grep -l "pytest.mark.device" tests/test_*.py | tr '\n' ' ')
t=$(( $(left) > 300 ? 150 : 90 ))
timeout "$t" "$PYTHON" -m pytest -q -p no:cacheprovider -m device -rs $files >"$OUT/tests.log" 2>&1
rc=$?
note "device tests ($files): rc $rc, $(tail -1 "$OUT/tests.log")"
[ $rc -eq 0 ] || status=1

# 4. a wider look, for information only: the trainer's tests run on CUDA too (--device auto) --
if [ "$MODE" = cpu ]; then
    note "wider tests: not in --cpu mode (they are make test's)" | tee "$OUT/tests-broad.log" >/dev/null
elif [ "$(left)" -gt 330 ]; then
    timeout 80 "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" -x \
        tests/test_trainer.py >"$OUT/tests-broad.log" 2>&1
    note "wider tests (information only): rc $?, $(tail -1 "$OUT/tests-broad.log")"
else
    note "wider tests: skipped, $(left)s left" | tee "$OUT/tests-broad.log" >/dev/null
fi

# 5. the benchmark: no run starts past --budget, each spawned run is cut at --timeout ------------
budget=$(( $(left) - 250 ))
[ "$budget" -gt 0 ] || budget=1
tiny=()
[ "$MODE" = cpu ] && tiny=(--cpu)
timeout "$(at_least5 $(($(left) - 100)))" "$PYTHON" benchmarks/gpu_step.py "${tiny[@]}" \
    --save "$OUT/gpu_step.json" --budget "$budget" --timeout 170 >"$OUT/gpu_step.log" 2>&1
rc=$?
note "gpu_step.py: rc $rc"
[ $rc -eq 0 ] || status=1

# 6. the FLAN-T5 walkthrough's settings (recipes/detox-flan-t5.yaml) on a random-init FLAN-T5-base:
#    the code path, offline (no hub model, reward, judge or DialogSum here), information only ----
if [ "$(left)" -gt 60 ]; then
    models=$(mktemp -d /tmp/tether-models.XXXX)
    size=(--steps 2 --judge-every 0)
    [ "$MODE" = cpu ] && size=(--steps 1 --batch-size 4 --mini-batch-size 2 --max-new-tokens 8)
    {
        "$PYTHON" benchmarks/gpu_step.py "${tiny[@]}" --write-model "t5:$models" &&
            timeout "$(at_least5 $(($(left) - 20)))" "$PYTHON" -m tether train --config recipes/detox-flan-t5.yaml \
                --policy "$models/flan-t5-base" --reward python:examples/rewards.py:positive_words \
                --judge '' --prompts jsonl:examples/prompts.jsonl --out "$models/run" "${size[@]}"
    } >"$OUT/flan-t5.log" 2>&1
    note "FLAN-T5 walkthrough settings, random-init model (information only): rc $?, $(tail -1 "$OUT/flan-t5.log")"
else
    note "FLAN-T5 walkthrough: skipped, $(left)s left"
fi

if [ -f "$OUT/gpu_step.json" ]; then
    "$PYTHON" benchmarks/gpu_step.py --show "$OUT/gpu_step.json" >>"$SUMMARY" 2>&1
fi
note "done in $((SECONDS - START))s, status $status"
exit $status
