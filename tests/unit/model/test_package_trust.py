"""A package runs no code it names unless the caller trusts it, and no code it was not built from.

The attack (issue 12, finding 5): changing `model.yaml`'s `name:` to `evil.py:factory` ran that file on
`load()`. Here evil.py would leave a marker file if it ever ran.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from splitexit import DataError, EarlyExitNet, IntegrityError, ModelSource, PackageError, build_model, load, save
from splitexit.app.package_data import package_dataset
from splitexit.config import DataSplit
from splitexit.model.manifest import manifest_text
from splitexit.model.package import MANIFEST_FILE, SPEC_FILE

MODEL_CODE = ("from torch import nn\n"
              "def small(num_classes=10):\n"
              "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))\n")


@pytest.fixture
def evil(tmp_path: Path) -> tuple[str, Path]:
    """A factory spec whose file, if imported, writes a marker; and the marker's path."""
    marker = tmp_path / "pwned"
    code = tmp_path / "evil.py"
    code.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + MODEL_CODE)
    return f"{code}:small", marker


@pytest.fixture
def user_package(tmp_path: Path) -> tuple[Path, str]:
    """A package built from the user's own file, and that file's factory spec."""
    code = tmp_path / "mine.py"
    code.write_text(MODEL_CODE)
    spec = f"{code}:small"
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model(spec), torch.zeros(1, 1, 8, 8), source=ModelSource(name=spec)).eval()
    return save(net, tmp_path / "pkg"), spec


def zoo_package(tmp_path: Path) -> Path:
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10)).eval()
    return save(net, tmp_path / "zoo")


def renamed(package: Path, name: str, *, resign: bool) -> None:
    spec = yaml.safe_load((package / SPEC_FILE).read_text())
    spec["model"]["name"] = name
    (package / SPEC_FILE).write_text(yaml.safe_dump(spec))
    if resign:  # a forger who also rewrites the manifest
        (package / MANIFEST_FILE).write_text(manifest_text(package / SPEC_FILE, name))


def test_a_model_yaml_edited_after_packaging_is_refused_before_any_import(tmp_path: Path,
                                                                         evil: tuple[str, Path]) -> None:
    package = zoo_package(tmp_path)
    spec, marker = evil
    renamed(package, spec, resign=False)
    with pytest.raises(IntegrityError, match="model.yaml was changed"):
        load(package, trust_models=[spec])  # even trusted code: this is not the spec the package was written with
    assert not marker.exists()


def test_a_consistent_package_naming_untrusted_code_is_refused_before_any_import(tmp_path: Path,
                                                                                 evil: tuple[str, Path]) -> None:
    package = zoo_package(tmp_path)
    spec, marker = evil
    renamed(package, spec, resign=True)
    with pytest.raises(PackageError, match=r"not told to trust.*--trust-model"):
        load(package)
    assert not marker.exists()


def test_trusted_user_code_loads_and_code_changed_since_packaging_is_refused(user_package: tuple[Path, str]) -> None:
    package, spec = user_package
    with pytest.raises(PackageError, match="not told to trust"):
        load(package)
    x = torch.randn(3, 1, 8, 8)
    assert load(package, trust_models=[spec])(x)[-1].shape == (3, 10)
    code = Path(spec.rpartition(":")[0])
    code.write_text(code.read_text() + "# changed\n")
    with pytest.raises(IntegrityError, match="the code changed since the package was written"):
        load(package, trust_models=[spec])


def test_trust_compares_file_paths_resolved(user_package: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    package, spec = user_package
    code = Path(spec.rpartition(":")[0])
    monkeypatch.chdir(code.parent)
    assert load(package, trust_models=[f"./{code.name}:small"]) is not None


def test_a_package_without_a_manifest_is_refused(tmp_path: Path) -> None:
    package = zoo_package(tmp_path)
    (package / MANIFEST_FILE).unlink()
    with pytest.raises(PackageError, match="manifest.json is missing"):
        load(package)


def test_a_recorded_dataset_from_user_code_needs_trust(tmp_path: Path, evil: tuple[str, Path]) -> None:
    package = zoo_package(tmp_path)
    net = load(package)
    spec, marker = evil
    with pytest.raises(DataError, match="not told to trust"):
        package_dataset(package, net, DataSplit(dataset=spec), None)
    assert not marker.exists()
