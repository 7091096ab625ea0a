"""report.html renders in a real headless Chromium: every picture loads and the page is
not blank. Skipped when Chromium is missing, unless NNSIM_REQUIRE_CHROMIUM=1 (CI)."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import nnsim_hooks
from audit_fixtures import digits_with_every_finding

pytestmark = pytest.mark.slow  # one audit in a subprocess, then Chromium renders its report

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--disable-dev-shm-usage"]

PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", imgs.length);
  document.body.setAttribute("data-loaded", ok);
});
</script></body>"""


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("NNSIM_REQUIRE_CHROMIUM") == "1":
        pytest.fail("NNSIM_REQUIRE_CHROMIUM=1 but no chromium executable is on PATH (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); set NNSIM_REQUIRE_CHROMIUM=1 to require it")


def browse(binary, tmp_path, *args):
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A real audit's report, with something in every gallery."""
    model, ds = digits_with_every_finding()
    out = tmp_path_factory.mktemp("report")
    result = nnsim_hooks.audit(model, ds, progress=False, sketch_dim=128, k=6, out_dir=out / "audit")
    assert result.summary["label_issues"] > 0 and result.summary["duplicate_groups"] > 0
    return out / "audit" / "report.html"


def test_report_is_self_contained(report):
    text = report.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text)  # the table's script is inline
    srcs = re.findall(r'src="([^"]+)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(href|src)="(https?:|//)', text)  # nothing fetched from the network


def test_every_picture_loads_in_chromium(report, tmp_path):
    binary = chromium()
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE))
    dom = browse(binary, tmp_path, "--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
    images = re.search(r'data-images="(\d+)"', dom)
    loaded = re.search(r'data-loaded="(\d+)"', dom)
    assert images and loaded, "the load handler did not run: " + dom[:300]
    n_images = report.read_text().count("<img ")  # the table's script adds its thumbnails
    assert int(images.group(1)) > n_images > 20
    assert int(loaded.group(1)) == int(images.group(1))


def test_screenshot_is_not_blank(report, tmp_path):
    from PIL import Image

    binary = chromium()
    shot = tmp_path / "shot.png"
    browse(binary, tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri())
    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    assert image.shape[:2] == (2400, 1280)
    assert image.std() > 20  # a blank page has no contrast
    colours = len(np.unique(image.reshape(-1, 3)[::7], axis=0))
    assert colours > 100  # text, tables, thumbnails and plots
    header = image[:60].mean(axis=(0, 1))  # the dark header bar was drawn (CSS applied)
    assert header.max() < 120


def test_the_probe_notices_a_broken_picture(report, tmp_path):
    """Negative control: the same check on a page with one corrupt picture fails."""
    binary = chromium()
    probe = tmp_path / "broken.html"
    broken = '<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB">'
    probe.write_text(report.read_text().replace("<main>", "<main>" + broken, 1).replace("</body>", PROBE))
    dom = browse(binary, tmp_path, "--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    loaded = int(re.search(r'data-loaded="(\d+)"', dom).group(1))
    assert loaded == images - 1
