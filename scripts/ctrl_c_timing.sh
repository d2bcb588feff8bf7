#!/usr/bin/env bash
# How long a terminal's Ctrl-C takes to end a run: start a `tiny` run as a terminal starts a job (a process group of
# its own), send SIGINT to the whole group after AFTER_S seconds, as Ctrl-C does, and time until no process of the
# group is left. Then print the learner's last log lines (whether it checkpointed with a buffer snapshot).
#
#     bash scripts/ctrl_c_timing.sh [AFTER_S=45]
set -euo pipefail
cd "$(dirname "$0")/.."
after_s=${1:-45}
runs=$(mktemp -d)
setsid .venv/bin/python run_async.py --preset tiny --learner.total-steps 1000 --run.name ctrl-c \
    --run.runs-dir "$runs" --quiet > "$runs/out.log" 2>&1 &
pid=$!
sleep "$after_s"
pgid=$(ps -o pgid= "$pid" | tr -d ' ')
start=$(date +%s.%N)
kill -INT -- "-$pgid"
while pgrep -g "$pgid" > /dev/null; do sleep 0.1; done
end=$(date +%s.%N)
echo "Ctrl-C after ${after_s} s: every process gone after $(python3 -c "print(f'{$end - $start:.1f}')") s"
tail -n 3 "$runs/ctrl-c/logs/learner.log"
rm -rf "$runs"
