#!/usr/bin/env bash
# Build a local text-generation-webui ("webui") host for the opt-in integration tests in
# tests/integration/ (webui commit 1dcde41d, Transformers loader on the CPU).
#
# Usage:  tools/setup_webui_host.sh WEBUI_DIR
#
# WEBUI_DIR is the webui checkout. If it does not exist yet, WEBUI_GIT_DIR must name a git directory
# (a clone or mirror of oobabooga/text-generation-webui) that holds commit 1dcde41d; the tree is then
# exported into WEBUI_DIR with `git archive` (no webui code is copied into this repository).
#
# Environment (all optional):
#   WEBUI_VENV      venv to create             (default: <parent of WEBUI_DIR>/venv)
#   WEBUI_BUILD     build area for the gradio fork (default: <parent of WEBUI_DIR>/build)
#   PYTHON          interpreter for the venv   (default: python3.11)
#   WEBUI_GIT_DIR   see above
#   GRADIO_WHEELS   folder that already holds gradio-4.37.2+custom.20-*.whl and
#                   gradio_client-1.0.2+custom.20-*.whl: installed as they are
#   GRADIO_SRC      source tree of oobabooga/gradio at tag 4.37.2-custom.20, or
#   GRADIO_GIT_DIR  a git directory holding that tag: the fork is built from source (needs node >= 18
#                   and npm; pnpm 9.1 comes from the npm registry; about 3 minutes on 2 cores)
#
# Gradio: webui pins oobabooga's fork (gradio 4.37.2+custom.20), published only as GitHub release
# wheels. PyPI's gradio 4.37.2 cannot stand in for it (webui-host.md §14), but the fork's tag builds
# offline from source: its frontend (gradio/templates/frontend) is not committed, so it is built with
# pnpm from the committed lockfile, then both wheels are built with pip. Without any of GRADIO_*, the
# host is API-only: webui's --nowebui path imports no gradio at all (modules/chat.py, extensions.py and
# text_generation.py import it lazily), and the integration tests that need the UI skip.
#
# After it finishes:
#   export WEBUI_DIR=<WEBUI_DIR> WEBUI_PYTHON=<WEBUI_VENV>/bin/python
#   python -m pytest tests/integration -v
set -euo pipefail

WEBUI_COMMIT=1dcde41d03d13fc768316f4d2256a8a6dd044268
GRADIO_TAG=4.37.2-custom.20
GRADIO_VERSION=4.37.2+custom.20
GRADIO_CLIENT_VERSION=1.0.2+custom.20
TORCH_VERSION=2.13.0

if [[ $# -ne 1 ]]; then
    sed -n '2,30p' "$0" >&2
    exit 2
fi

WEBUI_DIR=$(realpath -m "$1")
HOST_ROOT=$(dirname "$WEBUI_DIR")
WEBUI_VENV=${WEBUI_VENV:-$HOST_ROOT/venv}
WEBUI_BUILD=${WEBUI_BUILD:-$HOST_ROOT/build}
PYTHON=${PYTHON:-python3.11}

say() { printf '\n== %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# git archive of a tree whose mirror lacks some blobs (large data files): export everything except them.
export_tree() {  # git_dir rev dest
    local git_dir=$1 rev=$2 dest=$3 excludes=() entries=() states=() i
    git --git-dir="$git_dir" rev-parse --verify --quiet "$rev^{commit}" >/dev/null \
        || die "$git_dir has no $rev"
    mapfile -t entries < <(git --git-dir="$git_dir" ls-tree -r "$rev" | awk '$2 == "blob"')
    mapfile -t states < <(printf '%s\n' "${entries[@]}" | awk '{print $3}' | git --git-dir="$git_dir" cat-file --batch-check)
    for i in "${!entries[@]}"; do
        if [[ ${states[$i]} == *" missing" ]]; then
            excludes+=(":(exclude)${entries[$i]#*$'\t'}")
        fi
    done
    if ((${#excludes[@]})); then
        printf 'skipping %d file(s) whose contents the git directory lacks\n' "${#excludes[@]}"
    fi
    mkdir -p "$dest"
    # git archive still names each excluded missing blob on stderr ("error: invalid object"); it
    # exits 0 and leaves those files out.
    git --git-dir="$git_dir" archive "$rev" -- . "${excludes[@]}" | tar -x -C "$dest"
}

# ---------------------------------------------------------------------------------------------
say "webui checkout: $WEBUI_DIR"
if [[ ! -f $WEBUI_DIR/server.py ]]; then
    [[ -n ${WEBUI_GIT_DIR:-} ]] || die "$WEBUI_DIR has no server.py; set WEBUI_GIT_DIR to export commit ${WEBUI_COMMIT:0:8} there"
    export_tree "$WEBUI_GIT_DIR" "$WEBUI_COMMIT" "$WEBUI_DIR"
    echo "$WEBUI_COMMIT" >"$WEBUI_DIR/.webui_commit"
fi
REQUIREMENTS=$WEBUI_DIR/requirements/full/requirements_cpu_only.txt
[[ -f $REQUIREMENTS ]] || die "$REQUIREMENTS not found; is $WEBUI_DIR a webui checkout at ${WEBUI_COMMIT:0:8}?"

# ---------------------------------------------------------------------------------------------
say "venv: $WEBUI_VENV"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (webui is tested here with Python 3.11)"
[[ -x $WEBUI_VENV/bin/python ]] || "$PYTHON" -m venv "$WEBUI_VENV"
PIP=("$WEBUI_VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet "torch==$TORCH_VERSION"
# webui's CPU requirements minus the GitHub release wheels (gradio fork, llama.cpp binaries): the
# Transformers loader needs no llama.cpp, and gradio is handled below.
FILTERED=$WEBUI_BUILD/requirements_cpu_no_release_wheels.txt
mkdir -p "$WEBUI_BUILD"
grep -v -E '^[[:space:]]*(#|$|https?://)' "$REQUIREMENTS" >"$FILTERED"
"${PIP[@]}" install --quiet -r "$FILTERED"

# ---------------------------------------------------------------------------------------------
find_wheel() { compgen -G "$1/$2-$3-*.whl" | head -n1 || true; }

install_wheels() {  # folder
    local gradio client
    gradio=$(find_wheel "$1" gradio "$GRADIO_VERSION")
    client=$(find_wheel "$1" gradio_client "$GRADIO_CLIENT_VERSION")
    [[ -n $gradio && -n $client ]] || die "$1 lacks the gradio $GRADIO_VERSION / gradio_client $GRADIO_CLIENT_VERSION wheels"
    "${PIP[@]}" install --quiet "$client" "$gradio"
}

build_gradio_fork() {  # source_tree
    local src=$1 tools=$WEBUI_BUILD/node-tools wheels=$WEBUI_BUILD/wheels
    command -v node >/dev/null && command -v npm >/dev/null || die "building the gradio fork needs node >= 18 and npm"
    [[ $(node -p 'process.versions.node.split(".")[0]') -ge 18 ]] || die "node >= 18 needed, found $(node --version)"
    [[ -f $src/gradio/package.json ]] || die "$src is not a gradio source tree"
    grep -q "\"$GRADIO_VERSION\"" "$src/gradio/package.json" || die "$src is not gradio $GRADIO_VERSION"
    # The lockfile pins pnpm ~9.1 (package.json engines); keep it out of the system's global modules.
    [[ -x $tools/node_modules/.bin/pnpm ]] || npm install --silent --prefix "$tools" pnpm@9.1
    # The frontend build prints thousands of lines (svelte a11y warnings): keep them in a log.
    local log=$WEBUI_BUILD/gradio-frontend-build.log
    echo "building the gradio frontend (log: $log)"
    if ! (
        cd "$src"
        export PATH=$tools/node_modules/.bin:$PATH
        pnpm install --frozen-lockfile --ignore-scripts
        GRADIO_VERSION=$GRADIO_VERSION pnpm build
    ) >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "the gradio frontend build failed (full log: $log)"
    fi
    [[ -f $src/gradio/templates/frontend/index.html ]] || die "the frontend build left no gradio/templates/frontend/index.html"
    mkdir -p "$wheels"
    "${PIP[@]}" wheel --quiet --no-deps -w "$wheels" "$src" "$src/client/python"
    install_wheels "$wheels"
}

say "gradio"
if [[ -n ${GRADIO_WHEELS:-} ]]; then
    install_wheels "$GRADIO_WHEELS"
elif [[ -n $(find_wheel "$WEBUI_BUILD/wheels" gradio "$GRADIO_VERSION") ]]; then
    echo "reusing the wheels built earlier in $WEBUI_BUILD/wheels"
    install_wheels "$WEBUI_BUILD/wheels"
elif [[ -n ${GRADIO_SRC:-} ]]; then
    build_gradio_fork "$GRADIO_SRC"
elif [[ -n ${GRADIO_GIT_DIR:-} ]]; then
    src=$WEBUI_BUILD/gradio-src
    [[ -f $src/gradio/package.json ]] || export_tree "$GRADIO_GIT_DIR" "refs/tags/$GRADIO_TAG" "$src"
    build_gradio_fork "$src"
else
    echo "no GRADIO_WHEELS, GRADIO_SRC or GRADIO_GIT_DIR: API-only host (run webui with --nowebui)"
fi

# ---------------------------------------------------------------------------------------------
say "check"
"$WEBUI_VENV/bin/python" -m pip check
"$WEBUI_VENV/bin/python" - <<'EOF'
import importlib.util

import fastapi, huggingface_hub, torch, transformers

print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"huggingface_hub {huggingface_hub.__version__}, fastapi {fastapi.__version__}")
if importlib.util.find_spec("gradio"):
    import gradio
    print(f"gradio {gradio.__version__} (webui UI available)")
else:
    print("gradio not installed (API-only host: --nowebui)")
EOF
cat <<EOF

Done. To run the integration tests:
  export WEBUI_DIR=$WEBUI_DIR WEBUI_PYTHON=$WEBUI_VENV/bin/python
  python -m pytest tests/integration -v
EOF
