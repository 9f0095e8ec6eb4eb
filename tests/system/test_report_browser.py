"""The run report of a real run, with a replica stopped half-way, loaded in a real headless Chromium: every
section is there, every plot decodes, and the membership change is named on the page."""

from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from splitexit.config import ClusterSpec
from splitexit.control.edge import Entry, RunResult
from splitexit.report.run_report import write_report
from splitexit.report.run_summary import summarize
from splitexit.runtime.records import RequestRecord
from support import digits_net, free_port, start_nodes

pytestmark = pytest.mark.slow

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
CHROMIUM = next((found for name in BROWSERS if (found := shutil.which(name))), None)
INPUTS = 240
#: Stop the replica once this many answers are in.
STOP_AFTER = 60
#: Runs in the page once it has loaded (images decoded), and leaves what it found in the DOM for --dump-dom.
PROBE = """<script>
window.addEventListener("load", () => {
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    sections: [...document.querySelectorAll("section > h2")].map(h => h.textContent),
    images: [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight,
                                           complete: i.complete})),
    text: document.body.innerText,
  });
  document.body.appendChild(probe);
});
</script>"""


def a_run_that_loses_a_replica(cache: Path) -> RunResult:
    """240 digits inputs through edge -> {cloud1, cloud1b}; cloud1b stops after 60 answers."""
    cluster = ClusterSpec.model_validate({
        "nodes": [{"name": "edge", "role": "edge"},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}", "tier": 1},
                  {"name": "cloud1b", "address": f"127.0.0.1:{free_port()}", "tier": 1}],
        "window": 4})
    inputs = TensorDataset(torch.randn(INPUTS, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
                           torch.randint(0, 10, (INPUTS,), generator=torch.Generator().manual_seed(2)))

    async def go() -> RunResult:
        nodes = await start_nodes(cluster, cache)
        entry = Entry(digits_net(), cluster)
        stopping: list[asyncio.Task[None]] = []

        def count(_: RequestRecord) -> None:
            if not stopping and len(answers) >= STOP_AFTER:
                stopping.append(asyncio.get_running_loop().create_task(nodes[1].stop(grace=0)))
            answers.append(1)

        answers: list[int] = []
        try:
            await entry.start()
            return await entry.run(inputs, on_record=count)
        finally:
            await entry.close()
            await asyncio.gather(*stopping)
            await nodes[0].stop(grace=2)

    return asyncio.run(go())


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium-headless-shell)")
def test_the_report_of_a_real_run_renders_in_chromium(tmp_path: Path) -> None:
    result = a_run_that_loses_a_replica(tmp_path / "cache")
    assert len(result.records) == INPUTS and all(r.error is None for r in result.records), \
        [r.error for r in result.records if r.error][:3]
    assert any(m.node == "cloud1b" for m in result.membership), result.membership
    report = summarize(result)
    paths = write_report(report, result.records, tmp_path / "report")
    probed = tmp_path / "probed.html"
    probed.write_text(paths["html"].read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                      encoding="utf-8")
    assert CHROMIUM is not None
    dumped = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                             "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                            capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dumped.stdout, re.S)
    assert found, f"the page did not load in {CHROMIUM}: {dumped.stderr[-2000:]}"
    page = json.loads(html.unescape(found.group(1)))
    for section in ("Run", "Summary", "Latency over time", "Plans: predicted and measured", "Membership changes",
                    "Edges", "Nodes", "Exits", "Confusion matrix", "Latency", "Links"):
        assert section in page["sections"], (section, page["sections"])
    alts = [image["alt"] for image in page["images"]]
    assert {"Latency over time", "Confusion matrix", "Bytes per link"} <= set(alts), alts
    for image in page["images"]:
        assert image["complete"] and image["width"] >= 400 and image["height"] >= 200, image
    assert "cloud1b" in page["text"] and re.search(r"cloud1b\s+(left|broke)", page["text"]), \
        "the membership table names the replica that went"
