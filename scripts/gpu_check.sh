#!/usr/bin/env bash
# The GPU check: one command on a machine with a CUDA GPU, one folder of results, in under 8 minutes
# (10 with --nproc 2): each stage has a time limit, cut to what is left of the budget; a stage
# without time left is recorded as skipped.
#   bash scripts/gpu_check.sh              tests marked `cuda`, tiny-moe and tiny-dense trained for 200
#                                          steps with compile=true, bench moe / train / generate --device cuda
#   bash scripts/gpu_check.sh --nproc 2    also DDP and FSDP trainings on 2 GPUs (NCCL)
#   --out DIR                              where the results go (default gpu-check-<time>)
#   PYTHON=path                            the interpreter (default .venv/bin/python, else python3)
# Writes DIR/summary.json (each stage: ok, seconds, and its key numbers), every stage's log and JSON,
# and the runs' metrics. Every stage runs even when one fails; the exit code is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
NPROC=1
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc) NPROC="${2:-}"; shift 2 || shift ;;
        --out) OUT="${2:-}"; shift 2 || shift ;;
        *) echo "scripts/gpu_check.sh: unknown option $1 (use --nproc N, --out DIR)" >&2; exit 2 ;;
    esac
done
case "$NPROC" in
    1|2) ;;
    *) echo "scripts/gpu_check.sh: --nproc must be 1 or 2, not '$NPROC'" >&2; exit 2 ;;
esac
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# One line and exit 1 when there is no GPU to check (before anything is written).
GPUS=$("$PY" - <<'PYEOF' 2>/dev/null
from nanomoe.runtime import CUDA_INSTALL_COMMAND, cpu_torch_message, cpu_torch_on_a_gpu_machine
import torch
if torch.cuda.is_available():
    print(torch.cuda.device_count())
elif cpu_torch_on_a_gpu_machine():
    print(f"error: {cpu_torch_message()}")
else:
    print(f"error: no CUDA GPU is visible to torch {torch.__version__} (nvidia-smi should list one; on a GPU "
          f"machine install the CUDA build with: {CUDA_INSTALL_COMMAND})")
PYEOF
) || GPUS="error: $PY cannot import torch and nanomoe: run bash scripts/setup.sh --cuda first"
case "$GPUS" in
    error:*) echo "scripts/gpu_check.sh: ${GPUS#error: }" >&2; exit 1 ;;
esac
if [ "$NPROC" -gt "$GPUS" ]; then
    echo "scripts/gpu_check.sh: --nproc $NPROC needs $NPROC GPUs and $GPUS is visible; run without --nproc" >&2
    exit 1
fi
OUT="${OUT:-gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STATUS="$OUT/stages.tsv"
: > "$STATUS"
DEADLINE=$((SECONDS + 470 + (NPROC > 1 ? 120 : 0)))  # --nproc 2: two more minutes for DDP and FSDP
export NANOMOE_TRACEBACK=1  # a failure here is a report for a developer: keep the traceback in the log

# stage NAME LIMIT_SECONDS COMMAND...: runs COMMAND with its output in NAME.log, records ok and seconds
stage() {
    local name="$1" limit="$2"
    shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "$limit" >> "$STATUS"
        echo "[$(date +%H:%M:%S)] $name SKIPPED: the 8-minute budget is spent"
        return
    fi
    echo "[$(date +%H:%M:%S)] $name (at most ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$limit" >> "$STATUS"
    if [ "$rc" -eq 0 ]; then
        echo "    ok in ${took}s"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "    TIMED OUT after ${took}s: $OUT/$name.log"
    else
        echo "    FAILED (exit $rc) in ${took}s: $OUT/$name.log"
    fi
}

# stage_json NAME LIMIT COMMAND...: the same, with stdout (one JSON object) in NAME.json
stage_json() {
    local name="$1" limit="$2"
    shift 2
    stage "$name" "$limit" bash -c '"$@" > "$0"' "$OUT/$name.json" "$@"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" - > "$OUT/environment.json" <<'PYEOF'
import json, platform, torch
print(json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    "capability": list(torch.cuda.get_device_capability(0)),
}, indent=2))
PYEOF

TRAIN=(-m nanomoe train --data builtin --device cuda --max-steps 200 --no-progress --set compile=true
       --set samples=0 --set eval_every=200 --set log_every=20)
stage data 60 "$PY" -c "from nanomoe.data import builtin_corpus_dir; print(builtin_corpus_dir())"
stage tests 120 "$PY" -m pytest -q -rs -m cuda tests/ --junitxml "$OUT/tests.xml"
stage train-tiny-moe 120 "$PY" "${TRAIN[@]}" --preset tiny-moe --out "$OUT/train-tiny-moe"
stage train-tiny-dense 90 "$PY" "${TRAIN[@]}" --preset tiny-dense --out "$OUT/train-tiny-dense"
stage_json bench-moe 60 "$PY" -m nanomoe bench moe --device cuda --json
stage_json bench-train 60 "$PY" -m nanomoe bench train --device cuda --json
stage_json bench-generate 60 "$PY" -m nanomoe bench generate --device cuda --repeats 2 --new-tokens 128 --json
if [ "$NPROC" -ge 2 ]; then
    for strategy in ddp fsdp; do
        stage "train-$strategy-nproc$NPROC" 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
            -m nanomoe train --strategy "$strategy" --preset tiny-moe --data builtin --device cuda --max-steps 50 \
            --no-progress --set samples=0 --set eval_every=50 --set log_every=10 --out "$OUT/train-$strategy-nproc$NPROC"
    done
fi

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {"folder": str(out), "environment": json.loads((out / "environment.json").read_text()), "stages": {}}
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    if rc == "skipped":
        summary["stages"][name] = {"ok": False, "skipped": "the 8-minute budget was spent"}
        continue
    stage = {"ok": rc == "0", "exit_code": int(rc), "seconds": int(seconds), "limit_seconds": int(limit)}
    if rc in ("124", "137"):
        stage["timed_out"] = True
    result = out / f"{name}.json"
    if result.is_file():
        try:
            report = json.loads(result.read_text())
            stage["numbers"] = {k: v for k, v in report.items() if isinstance(v, (int, float, str))}
        except ValueError:
            stage["ok"] = False
            stage["error"] = f"{result.name} is not JSON"
    metrics = out / name / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(r) for r in metrics.read_text().splitlines() if r.strip()]
        train = [r for r in rows if r.get("kind") == "train"]
        evals = [r for r in rows if r.get("kind") == "eval"]
        if train:
            stage["numbers"] = {k: train[-1].get(k) for k in ("step", "loss", "tokens_per_s", "mfu")}
        if evals:
            stage.setdefault("numbers", {})["val_loss"] = evals[-1].get("loss")
    summary["stages"][name] = stage
summary["ok"] = all(s["ok"] for s in summary["stages"].values())
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
failed = [n for n, s in summary["stages"].items() if not s["ok"]]
print(f"GPU check {'passed' if not failed else 'FAILED: ' + ', '.join(failed)}; results in {out}/ (summary.json)")
sys.exit(1 if failed else 0)
PYEOF
