"""Packages: save → load is exact, and every kind of damage is reported as a PackageError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from splitexit import (
    EarlyExitNet,
    ExitPolicy,
    IntegrityError,
    ModelSource,
    PackageError,
    build_model,
    load,
    read_spec,
    save,
)
from splitexit.model.manifest import file_sha256, manifest_text
from splitexit.model.package import MANIFEST_FILE, SPEC_FILE, WEIGHTS_FILE


def write_spec(package: Path, spec: dict) -> None:
    """Edit model.yaml the way a forger would: with a manifest that matches the edit."""
    (package / SPEC_FILE).write_text(yaml.safe_dump(spec))
    (package / MANIFEST_FILE).write_text(manifest_text(package / SPEC_FILE, spec["model"]["name"]))


@pytest.fixture
def net() -> EarlyExitNet:
    torch.manual_seed(0)
    model = build_model("digits_cnn")
    net = EarlyExitNet.from_model(model, torch.zeros(1, 1, 8, 8), source=ModelSource(name="digits_cnn", num_classes=10))
    net.set_policy(ExitPolicy(confidence="margin", temperatures=(0.5, 0.7, 1.1), thresholds=(0.3, 0.2)))
    return net.eval()


@pytest.fixture
def package(net: EarlyExitNet, tmp_path: Path) -> Path:
    return save(net, tmp_path / "pkg")


def test_save_then_load_gives_identical_outputs_and_policy(net: EarlyExitNet, package: Path) -> None:
    loaded = load(package)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        for expected, got in zip(net(x), loaded(x)):
            assert torch.equal(expected, got)
    assert loaded.policy == net.policy
    assert [c.id for c in loaded.exit_cuts] == [c.id for c in net.exit_cuts]
    first, second = net.infer(x), loaded.infer(x)
    assert torch.equal(first.prediction, second.prediction) and torch.equal(first.exit, second.exit)


def test_package_holds_only_yaml_safetensors_and_its_manifest(package: Path) -> None:
    assert sorted(p.name for p in package.iterdir()) == sorted([SPEC_FILE, WEIGHTS_FILE, MANIFEST_FILE])
    spec = read_spec(package)
    assert spec.weights_sha256 == file_sha256(package / WEIGHTS_FILE)
    assert spec.model.name == "digits_cnn"


def test_missing_weights_file_is_reported(package: Path) -> None:
    (package / WEIGHTS_FILE).unlink()
    with pytest.raises(PackageError, match="weights.safetensors is missing"):
        load(package)


def test_missing_spec_is_reported(package: Path) -> None:
    (package / SPEC_FILE).unlink()
    with pytest.raises(PackageError, match="model.yaml is missing"):
        load(package)


def test_missing_directory_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="splitexit train"):
        load(tmp_path / "nothing-here")


def test_tampered_weights_fail_the_checksum(package: Path) -> None:
    weights = package / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load(package)


def test_replaced_weights_with_wrong_shapes_are_refused_even_with_matching_checksum(package: Path) -> None:
    weights = package / WEIGHTS_FILE
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.startswith("heads."))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(weights))
    spec = yaml.safe_load((package / SPEC_FILE).read_text())
    spec["weights_sha256"] = file_sha256(weights)
    write_spec(package, spec)
    with pytest.raises(PackageError, match="do not fit"):
        load(package)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(unexpected=1), "unexpected"),
    (lambda s: s["policy"].update(thresholds=[0.5]), "thresholds"),
    (lambda s: s["policy"].update(temperatures=[-1, 1, 1]), "temperatures"),
    (lambda s: s.update(format="something-else/9"), "format"),
    (lambda s: s["exits"][0].update(cut="seven"), "cut"),
])
def test_invalid_spec_values_are_named(package: Path, edit, message: str) -> None:  # noqa: ANN001
    spec = yaml.safe_load((package / SPEC_FILE).read_text())
    edit(spec)
    (package / SPEC_FILE).write_text(yaml.safe_dump(spec))
    with pytest.raises(PackageError, match=message):
        load(package)


def test_exit_moved_to_another_node_is_detected(package: Path) -> None:
    spec = yaml.safe_load((package / SPEC_FILE).read_text())
    spec["exits"][0]["after"] = "some_other_node"
    write_spec(package, spec)
    with pytest.raises(PackageError, match="different version"):
        load(package)


def test_yaml_that_is_not_yaml(package: Path) -> None:
    (package / SPEC_FILE).write_text("model: [unclosed\n")
    with pytest.raises(PackageError, match="not valid YAML"):
        load(package)


def test_python_tags_in_yaml_are_not_executed(package: Path) -> None:
    (package / SPEC_FILE).write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(PackageError):
        load(package)


def test_net_without_source_cannot_be_saved(tmp_path: Path) -> None:
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8))
    with pytest.raises(PackageError, match="source="):
        save(net, tmp_path / "pkg")
