"""The napari plugin is installed, discoverable and valid; napari itself draws under Xvfb."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata, resources

import numpy as np
import pytest

PLUGIN = "napari-mupad"


def test_manifest_valid_with_imports():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution(PLUGIN)
    assert manifest.name == PLUGIN
    assert manifest.display_name == "MUPAD"
    manifest.validate_imports()  # raises if any python_name cannot be imported


def test_npe2_validate_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "--imports", PLUGIN],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout


def test_manifest_entry_point_and_packaged_yaml():
    eps = [ep for ep in metadata.entry_points(group="napari.manifest") if ep.name == PLUGIN]
    assert len(eps) == 1, f"napari.manifest entry point for {PLUGIN} not installed"
    assert eps[0].value == "napari_mupad:napari.yaml"
    assert resources.files("napari_mupad").joinpath("napari.yaml").is_file()


def test_plugin_manager_discovers_plugin():
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover(include_npe1=False)
    manifest = pm.get_manifest(PLUGIN)  # KeyError if not discovered
    assert manifest.display_name == "MUPAD"


def test_import_is_light():
    """napari imports the plugin package at start-up: it must not pull torch & co."""
    code = (
        "import sys, napari_mupad\n"
        "assert napari_mupad.__version__\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'mupad_core.models')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"import napari_mupad imported: {proc.stdout.strip()} {proc.stderr}"


def test_viewer_draws_under_xvfb(make_napari_viewer):
    """A shown viewer renders a layer (Xvfb + Mesa OpenGL + Qt stack works)."""
    viewer = make_napari_viewer(show=True)
    img = np.zeros((64, 128, 3), dtype=np.uint8)
    img[:, :64, 0] = 255  # red left half
    img[:, 64:, 1] = 255  # green right half
    viewer.add_image(img, rgb=True)
    viewer.reset_view()

    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))
    assert shot.ndim == 3 and shot.shape[-1] in (3, 4)
    rgb = shot[..., :3].astype(int)
    assert rgb.max() > 0, "screenshot is all black: OpenGL drawing does not work"
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    green = (rgb[..., 1] > 200) & (rgb[..., 0] < 60) & (rgb[..., 2] < 60)
    assert red.sum() > 100 and green.sum() > 100, "the image layer was not drawn"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
