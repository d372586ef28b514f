#!/usr/bin/env bash
# Regenerate the screenshots in docs/images that come from the plugin tests (a real napari
# viewer under Xvfb). Tests alone write to a temporary folder; this sets MUPAD_FIGURES.
#
#   bash scripts/update_figures.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export MUPAD_FIGURES="$PWD/docs/images" QT_API=pyqt6
exec .venv/bin/python -m pytest -q tests/test_user_guide.py tests/test_plugin_roi.py tests/test_plugin_stain.py tests/test_plugin_io.py \
    tests/test_plugin_synthetic.py tests/test_synthetic.py "$@"
