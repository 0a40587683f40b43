"""Render a report in headless Chromium: does every image load, is the console free of errors?

The page is copied next to the original with a small probe script prepended to ``<head>``: it
records window errors, failed resource loads and ``console.error`` calls, and after ``load``
writes them, with every image whose ``naturalWidth`` is 0, into a ``<pre id="bnlab-check">``
that ``--dump-dom`` returns. A screenshot of the unmodified page is taken on request.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)

_PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t !== window && t.tagName ? "failed to load " + t.tagName : String(e.message));
  }, true);
  var original = console.error;
  console.error = function () {
    errors.push(Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    var images = Array.prototype.slice.call(document.images);
    var broken = images.filter(function (i) { return !i.complete || i.naturalWidth === 0; })
                       .map(function (i) { return i.alt || i.src.slice(0, 40); });
    var out = document.createElement("pre");
    out.id = "bnlab-check";
    out.textContent = JSON.stringify({images: images.length, broken: broken, errors: errors});
    document.body.appendChild(out);
  });
})();
</script>"""


@dataclass
class BrowserCheck:
    """What Chromium saw: image count, images that did not decode, script/console errors."""

    images: int
    broken_images: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def ok(self) -> bool:
        return self.images > 0 and not self.broken_images and not self.errors


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def check_in_chromium(
    report: Path,
    *,
    screenshot: Path | None = None,
    window: tuple[int, int] = (1280, 2000),
    chromium: str | None = None,
    timeout: float = 60.0,
) -> BrowserCheck:
    """Load ``report`` in headless Chromium and return what it saw.

    Raises FileNotFoundError when no Chromium binary is found and RuntimeError when Chromium
    fails or its output carries no check result.
    """
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium binary found (apt-get install chromium)")
    text = report.read_text(encoding="utf-8")
    probed = re.sub(r"<head>", "<head>" + _PROBE, text, count=1)
    with tempfile.TemporaryDirectory(prefix="bnlab-chromium-") as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(probed, encoding="utf-8")
        common = [binary, *FLAGS, f"--user-data-dir={tmp}/profile"]
        env = {**os.environ, "HOME": tmp}
        done = subprocess.run(
            [*common, "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        match = re.search(r'<pre id="bnlab-check">(.*?)</pre>', done.stdout, re.S)
        if done.returncode != 0 or match is None:
            raise RuntimeError(
                f"chromium exited with {done.returncode} and no check result; stderr tail: "
                f"{done.stderr[-800:]}"
            )

        seen = json.loads(html.unescape(match.group(1)))
        if screenshot is not None:
            subprocess.run(
                [
                    *common,
                    f"--window-size={window[0]},{window[1]}",
                    f"--screenshot={screenshot}",
                    report.resolve().as_uri(),
                ],
                capture_output=True,
                timeout=timeout,
                check=True,
                env=env,
            )
    return BrowserCheck(
        images=int(seen["images"]),
        broken_images=list(seen["broken"]),
        errors=list(seen["errors"]),
        screenshot=screenshot,
    )
