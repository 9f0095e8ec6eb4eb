"""A tampered `model.yaml` runs none of the code it names, through the commands users run (issue 12, finding 5).

The review changed a package's `name:` to `evil.py:factory` and the edge ran that file on load. Here
evil.py would leave a marker file if it ever ran; `eval` and `run` must refuse the package with a clear
message, whether or not the forger also rewrote the manifest, and run nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from splitexit import save
from splitexit.model.manifest import manifest_text
from splitexit.model.package import MANIFEST_FILE, SPEC_FILE
from support import digits_net, free_port

pytestmark = pytest.mark.slow


def splitexit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitexit", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("resigned", [False, True], ids=["manifest-left", "manifest-rewritten"])
def test_a_package_renamed_to_evil_code_is_refused_by_eval_and_run(resigned: bool, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                    "from splitexit import build_model\n"
                    "def factory(num_classes=10):\n"
                    "    return build_model('digits_cnn', num_classes)\n")
    package = save(digits_net(), tmp_path / "pkg")
    spec = yaml.safe_load((package / SPEC_FILE).read_text())
    spec["model"]["name"] = f"{evil}:factory"
    (package / SPEC_FILE).write_text(yaml.safe_dump(spec))
    if resigned:
        (package / MANIFEST_FILE).write_text(manifest_text(package / SPEC_FILE, spec["model"]["name"]))
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"nodes": [{"name": "edge", "role": "edge"},
                                                 {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"}]}))
    says = "not told to trust" if resigned else "model.yaml was changed"
    for result in (splitexit("eval", str(package), "--data", "digits"),
                   splitexit("run", str(package), "--cluster", str(cluster), "--data", "digits")):
        assert result.returncode == 1, result.stdout + result.stderr
        assert says in " ".join(result.stderr.split()), result.stderr  # rich wraps long lines
        assert "Traceback" not in result.stderr
    assert not marker.exists(), "the package's code ran"
