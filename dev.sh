#!/usr/bin/env bash
# Development entry point. Sets up .venv on first use (Python 3.11, pinned torch CPU build), then:
#   bash dev.sh demo         speed up a model with half its channels masked, print the table
#   bash dev.sh test [args]  run the test suite (extra args go to pytest)
#   bash dev.sh bench NAME   run benchmarks/NAME.py
#   bash dev.sh setup        only set up (idempotent)
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY="$VENV/bin/python"

setup() {
    if [ ! -x "$PY" ]; then
        python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.setup-$(cat constraints/dev.txt core/pyproject.toml plugins/*/pyproject.toml | sha1sum | cut -c1-12)"
    if [ -f "$stamp" ]; then
        return
    fi
    "$PY" -m pip install --quiet --disable-pip-version-check -c constraints/dev.txt pip setuptools wheel
    "$PY" -m pip install --quiet --disable-pip-version-check -c constraints/dev.txt \
        torch torchvision transformers numpy pluggy pytest torch-pruning matplotlib timm
    "$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation -c constraints/dev.txt \
        -e core -e plugins/torchvision_ops -e plugins/transformers_ops
    # Dev-only: make torchvision importable against the CPU build of torch (see the module's docstring).
    local site
    site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    cp devtools/torchvision_cpu_shim.py "$site/"
    echo "import torchvision_cpu_shim; torchvision_cpu_shim.install()" > "$site/torchvision_cpu_shim.pth"
    rm -f "$VENV"/.setup-*
    touch "$stamp"
}

command="${1:-test}"
shift || true
setup
case "$command" in
    setup) ;;
    demo) exec "$PY" examples/demo.py "$@" ;;
    test) exec "$PY" -m pytest "$@" ;;
    bench)
        # A pip install compiles a package's modules; an editable one leaves them to the first import,
        # and with PYTHONDONTWRITEBYTECODE set every process would compile them again inside its first
        # speedup call (about 60 ms of plugin loading). Benchmarks time what an installed copy does.
        "$PY" -m compileall -q core/src plugins/*/src
        name="$1"; shift; exec "$PY" "benchmarks/$name.py" "$@" ;;
    *) echo "usage: bash dev.sh [setup|demo|test|bench NAME] [args]" >&2; exit 2 ;;
esac
