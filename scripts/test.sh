#!/usr/bin/env bash
# Run the napari-mupad test suite under Xvfb.
#
#   bash scripts/test.sh                 # whole suite
#   bash scripts/test.sh tests/test_plugin_manifest.py -x -q   # any pytest arguments
#
# The suite runs on one pytest-xdist worker per core (at most 4; MUPAD_TEST_WORKERS=N to choose,
# 0 for one process), each worker with its own Xvfb and its share of the torch threads.
# Runs scripts/setup.sh --with-system first (apt packages for Xvfb/Qt when missing: needs
# root or sudo; the venv; the project), checks the stack, then pytest with QT_API=pyqt6.
# pytest-xvfb starts the virtual X server; "no tests collected" counts as a failure.
set -euo pipefail

log() { printf '[test] %s\n' "$*"; }
die() { printf '[test] ERROR: %s\n' "$*" >&2; exit 1; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

bash scripts/setup.sh --with-system || die "scripts/setup.sh --with-system failed (see above)"

VPY="$REPO_ROOT/.venv/bin/python"
export QT_API=pyqt6

# The stack must really be there: pytest-xvfb only warns when Xvfb is missing, and the
# napari tests would then be skipped or fail in confusing ways.
command -v Xvfb >/dev/null 2>&1 \
    || die "Xvfb is not on PATH: install the Debian package 'xvfb' (bash scripts/setup.sh --with-system)"
for mod in torch napari openslide; do
    if ! err="$("$VPY" -c "import $mod" 2>&1)"; then
        printf '%s\n' "$err" | tail -n 5 >&2
        die "'import $mod' fails in .venv (see the error above); re-run bash scripts/setup.sh"
    fi
done
log "stack ok: Xvfb ($(command -v Xvfb)), torch, napari, openslide"

WORKERS="${MUPAD_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}"
[ "$WORKERS" -gt 4 ] && WORKERS=4
PARALLEL=()
if [ "$WORKERS" -gt 1 ]; then
    case " $* " in
        *" -n "*|*" -p no:xdist "*|*" --pdb "*) ;;  # the caller chose
        *) PARALLEL=(-n "$WORKERS" --dist worksteal) ;;
    esac
fi
log "running: .venv/bin/python -m pytest ${PARALLEL[*]} $*"
set +e
"$VPY" -m pytest "${PARALLEL[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    die "pytest collected no tests (exit 5): check the paths/arguments ($*)"
fi
exit "$rc"
