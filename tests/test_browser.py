"""The report renders in a real browser: headless Chromium loads it with no failed resource loads,
every figure decodes, and a screenshot of the page is not blank.

`make test` installs Debian's chromium package where it can (root and apt-get); elsewhere this test
skips and says why.
"""

import json
import re
import shutil
import subprocess

import pytest

import mechgrok as mg

CHECK = """
<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);  // after "load" every image has loaded or failed
  const decoded = imgs.map(i => i.complete && i.naturalWidth > 0);
  const external = performance.getEntriesByType("resource").map(e => e.name);
  const out = document.createElement("pre");
  out.id = "mechgrok-check";
  out.textContent = JSON.stringify({images: imgs.length, decoded: decoded.filter(Boolean).length, external});
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium found: `make test` installs Debian's chromium package when it runs as root with "
                "apt-get; install chromium (or google-chrome) to run the real-browser check")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "run"
    task, model, cfg = mg.presets.build("test", steps=40)
    run = mg.train(model, task, cfg.replace(eval_every=10, checkpoint_every=20), out=out, progress=False)
    mg.analyze(run, only=["progress"], progress=False)
    return mg.report.build(run)


def _run(browser: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=180)


def _check(browser: str, html: str, page) -> dict:
    """Load ``html`` (with the check script added) from ``page`` and return what the script found."""
    page.write_text(html.replace("</body>", CHECK + "</body>"))
    for _ in range(3):  # a loaded machine occasionally makes headless Chromium exit before the dump
        dom = _run(browser, "--dump-dom", page.as_uri())
        found = re.search(r'<pre id="mechgrok-check">(.*?)</pre>', dom.stdout, re.S)
        if found:
            break
    assert found, f"the check script did not run; chromium said: {dom.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"'))


def test_report_renders_in_chromium(report, tmp_path):
    browser = _chromium()
    html = report.read_text()
    assert not re.search(r'(src|href)="(?!data:|#)', html), "the report must not reference external files"
    result = _check(browser, html, tmp_path / "checked.html")
    assert result["images"] >= 3 and result["decoded"] == result["images"], result
    assert result["external"] == [], f"the report loaded external resources: {result['external']}"

    shot = tmp_path / "shot.png"
    _run(browser, f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri())
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert float(pixels.std()) > 0.05 and float((pixels < 0.5).mean()) > 0.002, "the screenshot is blank"


def test_the_check_catches_broken_pages(report, tmp_path):
    browser = _chromium()
    bad = report.read_text().replace("</body>", '<img src="data:image/png;base64,iVBORw0KGgoAAAA=">'
                                     '<img src="http://127.0.0.1:9/missing.png"></body>')
    result = _check(browser, bad, tmp_path / "bad.html")
    assert result["decoded"] <= result["images"] - 2
    assert any("missing.png" in url for url in result["external"])
