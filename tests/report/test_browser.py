"""report.html in a real headless browser: the page loads with no console error and every figure is
decoded and visible. Chromium from the OS packages (``apt-get install chromium``); skipped when absent."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hyperflux_fx.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "digits_cnn.py")
FAST = ["--dense-epochs", "2", "--epochs", "2", "--regrowth-epochs", "1", "--quiet", "--no-export"]
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

#: injected first into the page's head: records errors and console.error calls, and once the page has
#: loaded (every <details> opened) writes what it found into a <pre id="page-check"> of the DOM
CHECK = """<script>
window.pageErrors = [];
window.addEventListener("error",
  e => pageErrors.push(e.message || ("failed to load " + (e.target.src || "").slice(0, 40))), true);
const consoleError = console.error;
console.error = (...args) => { pageErrors.push(args.join(" ")); consoleError(...args); };
window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => { d.open = true; });
  const figures = [...document.querySelectorAll("img")].map(img => {
    const box = img.getBoundingClientRect();
    const style = getComputedStyle(img);
    return {alt: img.alt, decoded: img.complete && img.naturalWidth > 0 && img.naturalHeight > 0,
            shown: box.width > 50 && box.height > 50 && style.visibility !== "hidden" && style.display !== "none"};
  });
  const out = document.createElement("pre");
  out.id = "page-check";
  out.textContent = JSON.stringify({figures, errors: pageErrors});
  document.body.appendChild(out);
});
</script>"""


def check_page(page: Path) -> dict:
    """Open ``page`` (a copy with :data:`CHECK` injected) in headless Chromium; what the check found,
    with the browser's own console log lines."""
    probe = page.with_name("checked_" + page.name)
    probe.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + CHECK, 1), encoding="utf-8")
    run = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                          "--virtual-time-budget=10000", "--window-size=1280,4000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="page-check">(.*?)</pre>', run.stdout, re.S)
    assert found, f"the check did not run: {run.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    result["console"] = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    return result


@pytest.mark.skipif(BROWSER is None, reason="no headless browser (apt-get install chromium)")
def test_the_report_loads_without_errors_and_shows_every_figure_in_a_browser(tmp_path):
    out = tmp_path / "run"
    assert main([EXAMPLE, "--out", str(out), *FAST]) == 0
    text = (out / "report.html").read_text(encoding="utf-8")
    for title in ("Kept fraction per group and interval", "most active groups", "Flux distribution of survivors",
                  "Per-group sensitivity", "Loss per interval"):  # heatmap, raster, flux, sensitivity, learning
        assert title in text, title
    result = check_page(out / "report.html")
    assert not result["errors"] and not result["console"], (result["errors"], result["console"])
    assert len(result["figures"]) >= 8
    hidden = [f["alt"] for f in result["figures"] if not (f["decoded"] and f["shown"])]
    assert not hidden, f"figures not decoded or not visible: {hidden}"


@pytest.mark.skipif(BROWSER is None, reason="no headless browser (apt-get install chromium)")
def test_the_browser_check_fails_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><head></head><body><img alt='gone' src='data:image/png;base64,AAAA'/>"
                    "<script>undefinedFunction()</script></body></html>", encoding="utf-8")
    result = check_page(page)
    assert result["errors"] and [f["decoded"] for f in result["figures"]] == [False]
