#!/usr/bin/env bash
# The GPU check: what this project can only test on a CUDA machine, in one script of at most ~8 minutes on one GPU.
#
#     bash scripts/gpu_wheels.sh          # on a machine with internet, once: wheels into .whl/
#     bash scripts/gpu_check.sh           # on the GPU host, from the repository root (or anywhere: it cd's there)
#     bash scripts/gpu_check.sh --cpu-smoke   # anywhere: only check 4's Python part, tiny model on the CPU
#
# Needs python3 with torch (CUDA), transformers and msgpack; the rest (pyzmq, msgspec, tyro, rich,
# pytest) is installed from .whl/ into a temporary directory with `pip install --no-index` (no internet needed).
# Checks, each ending in one `SUMMARY <check>: ok|FAIL ...` line:
#   1. gpu tests     pytest -m gpu (the tests that skip without CUDA)
#   2. tiny run      run_async.py --preset tiny, HF engine, learner and actor on GPU 0 (shared: gloo weight sync)
#   3. throughput    scripts/learner_throughput.py: learner steps of a random Qwen2 0.5B-shaped model
#   4. fsdp          scripts/fsdp_throughput.py: the same model wrapped with FSDP2 on a 1-rank mesh (the sharded
#                    learner's code path: fully_shard per layer and root, bf16 gathers, float32 master weights),
#                    then one step with learner.cpu_offload and activation checkpointing
# Exit status: the number of failed checks.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
if [ "${1:-}" = "--cpu-smoke" ]; then  # this checkout's environment (no wheels, no GPU)
    PYTHONPATH="$PWD:${PYTHONPATH:-}" timeout 300 $PY scripts/fsdp_throughput.py --cpu-smoke 2>&1 \
        | grep '^fsdp_throughput' && echo "SUMMARY fsdp_cpu_smoke: ok" && exit 0
    echo "SUMMARY fsdp_cpu_smoke: FAIL"; exit 1
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
        || { echo "SUMMARY wheels: FAIL (pip install from .whl/)"; exit 9; }
    export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export DYNAMO_RL_CACHE="${DYNAMO_RL_CACHE:-$WORK/cache}"
FAILED=0
summary() {  # summary NAME STATUS DETAIL
    echo "SUMMARY $1: $2 $3"
    [ "$2" = ok ] || FAILED=$((FAILED + 1))
}
$PY -c "import torch; assert torch.cuda.is_available(); print('gpu:', torch.cuda.get_device_name(0), torch.__version__)" \
    || { echo "SUMMARY cuda: FAIL (torch.cuda.is_available() is False)"; exit 9; }

# 1. gpu-marked tests
timeout 180 $PY -m pytest -m gpu -q -p no:cacheprovider tests > "$WORK/pytest.log" 2>&1
code=$?
tail -n 5 "$WORK/pytest.log"
summary gpu_tests "$([ $code = 0 ] && echo ok || echo FAIL)" "($(tail -n 1 "$WORK/pytest.log"))"

# 2. the tiny preset end to end, learner and HF actor on the GPU
timeout 240 $PY run_async.py --preset tiny --run.runs-dir "$WORK/runs" --run.name tiny-gpu \
    --learner.device cuda --actor.device cuda --learner.total-steps 20 --run.eval-every 10 --run.wandb-mode disabled \
    > "$WORK/tiny.log" 2>&1
code=$?
tail -n 3 "$WORK/tiny.log"
detail=$($PY - "$WORK/runs/tiny-gpu" <<'PYEOF'
import json, sys
from pathlib import Path
rows = [json.loads(line) for line in Path(sys.argv[1], "metrics.jsonl").read_text().splitlines() if line.strip()]
steps = [r for r in rows if "loss/policy" in r]
last = steps[-1] if steps else {}
value = lambda key: float("nan") if last.get(key) is None else last[key]
print(f"steps={len(steps)} tokens_per_s={value('perf/tokens_per_s'):.0f} "
      f"peak_memory_mb={value('perf/peak_memory_mb'):.0f} reward={value('reward/correct_fraction'):.3f}")
PYEOF
)
summary tiny_run "$([ $code = 0 ] && [ -n "$detail" ] && echo ok || echo FAIL)" "(exit $code; $detail)"

# 3. learner throughput of a 0.5B Qwen2-shaped model (bf16 autocast over float32 master weights)
timeout 240 $PY scripts/learner_throughput.py --device cuda --size 0.5b --steps 3 > "$WORK/throughput.log" 2>&1
code=$?
line=$(grep '^learner_throughput' "$WORK/throughput.log" || tail -n 3 "$WORK/throughput.log")
summary throughput "$([ $code = 0 ] && echo ok || echo FAIL)" "($line)"

# 4. the FSDP2 learner step on one GPU (1-rank mesh), same model and batch as check 3
timeout 150 $PY scripts/fsdp_throughput.py --device cuda --size 0.5b --steps 2 > "$WORK/fsdp.log" 2>&1
code=$?
line=$(grep '^fsdp_throughput' "$WORK/fsdp.log" || tail -n 3 "$WORK/fsdp.log")
summary fsdp "$([ $code = 0 ] && echo ok || echo FAIL)" "($line)"
timeout 120 $PY scripts/fsdp_throughput.py --device cuda --size 0.5b --steps 1 --cpu-offload \
    --activation-checkpointing > "$WORK/fsdp_offload.log" 2>&1
code=$?
line=$(grep '^fsdp_throughput' "$WORK/fsdp_offload.log" || tail -n 3 "$WORK/fsdp_offload.log")
summary fsdp_offload "$([ $code = 0 ] && echo ok || echo FAIL)" "($line)"

echo "logs: $WORK"
exit $FAILED
