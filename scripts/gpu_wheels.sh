#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on a GPU host that has torch (CUDA), transformers and msgpack
# but no internet: pyzmq, msgspec, tyro, rich and pytest with their pure-Python needs, at the versions
# of this checkout's .venv, for CPython 3.12 on x86-64 Linux, into .whl/ (ignored by git).
#
#     bash scripts/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PACKAGES=(pyzmq==27.3.0 msgspec==0.23.0 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
          typing-extensions==4.16.0 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
          pytest==9.2.0 pytest-timeout==2.4.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" \
    -d .whl "${PACKAGES[@]}"
ls -la .whl
