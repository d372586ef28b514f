#!/usr/bin/env bash
# Set up a development environment for napari-mupad.
#
#   bash scripts/setup.sh                 # venv + Python packages
#   bash scripts/setup.sh --with-system   # also the Debian packages Xvfb/Qt need (apt)
#
# Idempotent: a re-run with everything in place takes a few seconds.
#
# Environment:
#   MUPAD_APT=1          same as --with-system
#   PYTHON=...           interpreter used to create .venv (default: python3)
#   MUPAD_TORCH_SPEC=... pip requirement(s) for torch, used only when torch is not
#                        importable in .venv (default: torch==2.13.0, the CPU build).
#                        On a GPU machine (nvidia-smi present) set it to your CUDA build,
#                        e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
#                        On a machine without nvidia-smi it must pin an exact version (==).
#   MUPAD_FORCE_PIP=1    re-run `pip install -e ".[test]"` even if pyproject.toml is unchanged
set -euo pipefail

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; [ $rc -ne 0 ] && printf "[setup] FAILED (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

WITH_SYSTEM="${MUPAD_APT:-0}"
for arg in "$@"; do
    case "$arg" in
        --with-system) WITH_SYSTEM=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument: $arg (use --with-system or --help)" ;;
    esac
done
[ "$WITH_SYSTEM" = "true" ] && WITH_SYSTEM=1

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="$REPO_ROOT/.venv"
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1

# --------------------------------------------------------------------------
# 1. Debian packages for Xvfb + Qt (PyQt6 xcb platform plugin) + Mesa OpenGL
# --------------------------------------------------------------------------
# xvfb/xauth: virtual X server for napari under pytest-xvfb.
# libxcb-*/libxkbcommon*/libx11-xcb1: what PyQt6's libqxcb.so links against
#   (on this image libxcb-icccm4 and libxcb-keysyms1 were the ones missing).
# libgl1/libegl1/libglx-mesa0/libgl1-mesa-dri: Mesa llvmpipe OpenGL for vispy.
SYSTEM_PACKAGES=(
    xvfb xauth
    libxcb1 libx11-xcb1 libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxcb-image0
    libxcb-randr0 libxcb-render0 libxcb-render-util0 libxcb-shape0 libxcb-shm0
    libxcb-sync1 libxcb-util1 libxcb-xfixes0 libxcb-xinerama0 libxcb-xkb1
    libxkbcommon0 libxkbcommon-x11-0
    libgl1 libegl1 libgl1-mesa-dri libglx-mesa0
    libfontconfig1 libfreetype6 libdbus-1-3 libglib2.0-0
)

is_installed() {
    local status
    status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" || return 1
    [ "$status" = "install ok installed" ]
}

install_system_packages() {
    command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
        || die "--with-system needs a Debian/Ubuntu machine (dpkg-query and apt-get not found)"
    local pkgs=("${SYSTEM_PACKAGES[@]}")
    # A Debian system python needs python3-venv to create .venv.
    if [ ! -x "$VPY" ]; then
        local py="${PYTHON:-python3}"
        if command -v "$py" >/dev/null 2>&1 && ! "$py" -c "import ensurepip" >/dev/null 2>&1; then
            local ver
            ver="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            pkgs+=("python${ver}-venv")
        fi
    fi
    local missing=() p
    for p in "${pkgs[@]}"; do
        is_installed "$p" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "system packages: all ${#pkgs[@]} present"
        return
    fi
    local SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 \
            || die "missing Debian packages (${missing[*]}) and not root and no sudo: install them as root"
        SUDO=(sudo -n)
    fi
    log "system packages missing: ${missing[*]}"
    log "running: apt-get update"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q \
        || die "apt-get update failed (needs root/sudo and access to the Debian mirrors)"
    log "running: apt-get install -y --no-install-recommends ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install failed for: ${missing[*]}"
}

if [ "$WITH_SYSTEM" = "1" ]; then
    install_system_packages
else
    log "system packages: skipped (use --with-system or MUPAD_APT=1 for Xvfb/Qt libraries)"
fi

# --------------------------------------------------------------------------
# 2. Virtual environment
# --------------------------------------------------------------------------
if [ -e "$VENV" ] && [ ! -x "$VPY" ]; then
    die "$VENV exists but $VPY is missing: remove $VENV and re-run"
fi
if [ ! -x "$VPY" ]; then
    PY="${PYTHON:-python3}"
    command -v "$PY" >/dev/null 2>&1 || die "no '$PY' on PATH: install Python >= 3.10 or set PYTHON=/path/to/python"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PY is $("$PY" -V 2>&1); napari-mupad needs Python >= 3.10 (set PYTHON=...)"
    log "creating $VENV with $("$PY" -V 2>&1) ($(command -v "$PY"))"
    "$PY" -m venv "$VENV" \
        || die "'$PY -m venv' failed; on Debian install python3-venv (or re-run with --with-system)"
    "$VPY" -m pip install -q --upgrade pip setuptools wheel
else
    "$VPY" -c 'import sys' >/dev/null 2>&1 || die "$VPY does not run (broken venv?): remove $VENV and re-run"
    log "venv: $VENV exists ($("$VPY" -V 2>&1))"
fi

# --------------------------------------------------------------------------
# 3. torch first, pinned (an unpinned torch would pull a multi-GB CUDA build)
# --------------------------------------------------------------------------
torch_version() { "$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null; }

if TORCH_BEFORE="$(torch_version)"; then
    log "torch: $TORCH_BEFORE already importable"
else
    TORCH_SPEC="${MUPAD_TORCH_SPEC:-torch==2.13.0}"
    if [ -n "${MUPAD_TORCH_SPEC:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
        case "$TORCH_SPEC" in
            *==*) log "MUPAD_TORCH_SPEC set on a machine without nvidia-smi: using '$TORCH_SPEC'" ;;
            *) die "MUPAD_TORCH_SPEC='$TORCH_SPEC' is not pinned (==) and there is no GPU (nvidia-smi): refusing, it would download a CUDA build. Unset it for torch==2.13.0." ;;
        esac
    fi
    log "installing torch first: pip install $TORCH_SPEC"
    # shellcheck disable=SC2086  # word splitting is intended (spec may carry --index-url ...)
    "$VPY" -m pip install $TORCH_SPEC || die "pip install $TORCH_SPEC failed"
    TORCH_BEFORE="$(torch_version)" || die "torch still not importable after 'pip install $TORCH_SPEC'"
    log "torch: $TORCH_BEFORE installed"
fi

# --------------------------------------------------------------------------
# 4. The project itself, editable, with the test + napari extras
# --------------------------------------------------------------------------
STAMP="$VENV/.mupad-setup-stamp"
WANT_STAMP="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "${MUPAD_FORCE_PIP:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT_STAMP" ] \
   && "$VPY" -c 'import mupad_core, napari_mupad, napari, pytest' >/dev/null 2>&1; then
    log "project: up to date with pyproject.toml (MUPAD_FORCE_PIP=1 to reinstall)"
else
    log "installing project: pip install -e \".[test]\""
    "$VPY" -m pip install -e ".[test]" || die "pip install -e \".[test]\" failed"
    TORCH_AFTER="$(torch_version)" || die "torch no longer importable after installing the project"
    if [ "$TORCH_AFTER" != "$TORCH_BEFORE" ]; then
        die "pip replaced torch $TORCH_BEFORE with $TORCH_AFTER; a dependency must not move torch (check pyproject.toml)"
    fi
    echo "$WANT_STAMP" > "$STAMP"
fi

log "done: $("$VPY" -c 'import torch, napari_mupad; print(f"torch {torch.__version__}, napari-mupad {napari_mupad.__version__}")')"
log "activate with: source .venv/bin/activate"
