"""Images in, names out (issue 15): a package trained on a folder of images at the size asked keeps how it
read them and its class names, and `splitexit infer` answers image files with those names — here, and
through a running cluster (`splitexit up`), with the same predictions as the net itself."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from splitexit import load, read_spec
from splitexit.config import ImageInput
from splitexit.model.images import read_image
from support import cli as splitexit
from support import cli_ok as ok
from support import cli_user_error as user_error
from support import free_port

pytestmark = pytest.mark.slow

SPEC = "size=8&channels=1&normalize=none"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes a small CNN tells apart: light and dark images of several sizes, none of them 8x8."""
    root = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    for name, level in (("dark", 40), ("light", 210)):
        (root / name).mkdir()
        for i in range(24):
            grey = level + rng.randint(-25, 25)
            size = (rng.randint(10, 30), rng.randint(10, 30))
            Image.new("RGB", size, (grey, grey, grey)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def package(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pkg") / "shades"
    ok(splitexit("train", "--model", "digits_cnn", "--data", f"folder:{images}?{SPEC}", "--out", str(path),
                 "--epochs", "6"))
    ok(splitexit("calibrate", str(path), "--max-drop", "0"))  # writes the package again: what it recorded stays
    return path


def answers(result: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in ok(result).stdout.splitlines()]


def expected(package: Path, files: list[Path]) -> list[int]:
    net = load(package)
    x = torch.stack([read_image(f, ImageInput(size=8, channels=1, normalize="none")) for f in files])
    return net.infer(x).prediction.tolist()


def test_the_package_keeps_how_images_are_read_and_the_class_names(package: Path) -> None:
    spec = read_spec(package)
    assert spec.images == ImageInput(size=8, channels=1, normalize="none")
    assert spec.classes == ("dark", "light") and spec.input.shape == (1, 8, 8)
    # eval re-reads the folder from the recorded spec: at 224x224 RGB it would be refused (the net takes 1x8x8)
    evaluated = json.loads(ok(splitexit("eval", str(package), "--json")).stdout)
    assert evaluated["samples"] == 9, evaluated  # the test split of 48 images


def test_infer_names_the_class_of_each_image_here(package: Path, images: Path) -> None:
    files = [images / "light" / "0.png", images / "dark" / "1.png", images / "light" / "2.png"]
    got = answers(splitexit("infer", str(package), *map(str, files), "--json"))
    assert [a["image"] for a in got] == list(map(str, files))
    assert [a["prediction"] for a in got] == expected(package, files)
    names = read_spec(package).classes or ()
    assert [a["name"] for a in got] == [names[a["prediction"]] for a in got]
    assert all(a["node"] == "local" and a["error"] is None and 0 < a["confidence"] <= 1 for a in got)
    table = ok(splitexit("infer", str(package), str(files[1]))).stdout
    assert f"{names[got[1]['prediction']]} ({got[1]['prediction']})" in table and "local" in table


def test_infer_through_a_running_cluster_gives_the_same_answers(package: Path, images: Path, tmp_path: Path) -> None:
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({
        "package": str(package),
        "nodes": [{"name": "edge", "role": "edge", "ends_at": "input"},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"}]}))
    files = sorted((images / "dark").glob("*.png"))[:3] + sorted((images / "light").glob("*.png"))[:3]
    up = subprocess.Popen([sys.executable, "-m", "splitexit", "up", "--cluster", str(cluster_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "cluster up" in (up.stdout.readline() if up.stdout else ""), up.stderr.read() if up.stderr else ""
        got = answers(splitexit("infer", str(package), *map(str, files), "--cluster", str(cluster_file), "--json"))
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert [a["prediction"] for a in got] == expected(package, files)
    names = read_spec(package).classes or ()
    assert [a["name"] for a in got] == [names[p] for p in expected(package, files)]
    assert {a["node"] for a in got} == {"cloud1"}, "the edge computes nothing: every answer is cloud1's"
    assert all(a["error"] is None and a["latency_ms"] > 0 for a in got)


def test_infer_mistakes_are_one_line(package: Path, images: Path, tmp_path: Path) -> None:
    user_error(splitexit("infer", str(package), str(tmp_path / "absent.png")), "absent.png does not exist")
    (tmp_path / "notes.png").write_text("not an image")
    user_error(splitexit("infer", str(package), str(tmp_path / "notes.png")), "cannot read", "notes.png as an image")
    digits = tmp_path / "digits"
    ok(splitexit("train", "--model", "digits_cnn", "--data", "digits", "--out", str(digits), "--epochs", "1"))
    user_error(splitexit("infer", str(digits), str(images / "dark" / "0.png")),
               "was not trained on image files", "--data folder:PATH")
