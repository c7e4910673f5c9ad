#!/usr/bin/env bash
# Create or update the project's virtual environment. The one place where install pitfalls are solved:
#   1. torch first, pinned, so that nothing later swaps it for another build (a CPU wheel stays CPU);
#   2. lmms-eval with --no-deps: its own requirements replace torch with a CUDA build and add torchvision;
#      the modules it imports come from effivlm's `lmms` extra instead;
#   3. no torchvision next to a CPU torch: the registry's torchvision breaks transformers' image processors
#      there (`operator torchvision::nms does not exist`); it is removed if something pulled it in;
#   4. packaging<26 (snakemake pins it; pyproject.toml says so too).
# Idempotent: a stamp keyed on pyproject.toml and this script makes a second run return at once.
#
# Environment:
#   EFFIVLM_VENV   where the environment lives (default: .venv in the repository)
#   PYTHON         the interpreter to build it from (default: the first python3.13/3.12/3.11/python3 that is >= 3.11)
#   TORCH_SPEC     the torch requirement (default: torch==2.13.0)
#   TORCH_INDEX    an index URL for torch, e.g. https://download.pytorch.org/whl/cpu on a laptop without a GPU
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${EFFIVLM_VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
LMMS_EVAL_SPEC="lmms-eval==0.7.3"

key="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
stamp="$VENV/.effivlm-setup-$key"
if [[ -x "$VENV/bin/python" && -f "$stamp" ]]; then
    echo "setup_env: $VENV is up to date"
    exit 0
fi

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [[ -n "$candidate" ]] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
    python="$(find_python)" || { echo "setup_env: Python >= 3.11 is required (snakemake 9 needs it); set PYTHON=..." >&2; exit 1; }
    echo "setup_env: creating $VENV with $("$python" --version)"
    "$python" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup_env: $VENV has Python < 3.11; remove it and run again" >&2
    exit 1
fi

pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)

# 1. torch, unless an acceptable one is already there (a CUDA build installed by hand is kept).
if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
    echo "setup_env: installing $TORCH_SPEC"
    "${pip[@]}" "$TORCH_SPEC" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
torch_before="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"

# 2. effivlm (editable) with lmms-eval's imports and the dev tools; torch stays as it is.
echo "setup_env: installing effivlm[lmms,dev]"
"${pip[@]}" -e ".[lmms,dev]" "torch==$torch_before"
"${pip[@]}" --no-deps "$LMMS_EVAL_SPEC"

# 3. no torchvision next to a CPU torch.
if "$VENV/bin/python" -c 'import importlib.util, sys, torch; sys.exit(not (importlib.util.find_spec("torchvision") and torch.version.cuda is None))' 2>/dev/null; then
    echo "setup_env: removing torchvision (it breaks transformers' image processors on a CPU torch)"
    "$VENV/bin/python" -m pip uninstall -y torchvision
fi

torch_after="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
if [[ "$torch_after" != "$torch_before" ]]; then
    echo "setup_env: torch changed from $torch_before to $torch_after; something pulled another build" >&2
    exit 1
fi

"$VENV/bin/python" -c 'import effivlm, snakemake, snakemake_executor_plugin_slurm, transformers, lmms_eval, torch; print(f"setup_env: ok: effivlm {effivlm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, snakemake {snakemake.__version__}")'
rm -f "$VENV"/.effivlm-setup-*
touch "$stamp"
