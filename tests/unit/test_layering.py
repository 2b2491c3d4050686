"""The package keeps its layers: data flows fuse -> client -> wire -> peer ->
store and no import points back up, nothing imports in a circle, and no module
takes another's private names. The rules live in tests/layering.py; the last
tests plant violations in a copy of the tree to prove the checks bite."""

from __future__ import annotations

import os
import shutil

import pytest

from tests import layering

SRC = layering.source_root()


@pytest.fixture(scope="module")
def package() -> layering.Package:
    return layering.read_package(SRC)


def test_the_package_is_found(package: layering.Package) -> None:
    assert "vdifs.errors" in package.modules
    assert "vdifs.cli.main" in package.modules
    assert package.imports


def test_every_import_follows_the_layers(package: layering.Package) -> None:
    found = layering.layer_violations(package)
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_no_import_cycles(package: layering.Package) -> None:
    found = layering.describe_cycles(package)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_no_module_takes_another_modules_private_names(package: layering.Package) -> None:
    found = layering.private_imports(package)
    assert not found, "private names used across modules:\n" + "\n".join(found)


def plant(root: str, rel: str, text: str) -> None:
    """Append source text to one module of the copied tree."""
    with open(os.path.join(root, *rel.split("/")), "a", encoding="utf-8") as f:
        f.write(text)


@pytest.fixture
def copied(tmp_path) -> str:
    shutil.copytree(os.path.join(SRC, "vdifs"), tmp_path / "vdifs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return str(tmp_path)


def test_the_checks_report_planted_violations(copied: str) -> None:
    clean = layering.read_package(copied)
    before_layers = set(layering.layer_violations(clean))
    before_cycles = layering.import_cycles(clean)
    before_private = set(layering.private_imports(clean))

    # An upward import, function-local so it only runs late (of a new cli
    # module that imports nothing, so it closes no cycle: every real cli
    # module reaches the store), a cycle inside model/ with one side hidden
    # behind TYPE_CHECKING, and a private name.
    plant(copied, "vdifs/cli/planted.py", "")
    plant(copied, "vdifs/store/objects.py", "\n\ndef _planted() -> None:\n    import vdifs.cli.planted\n")
    plant(copied, "vdifs/model/sizes.py", "\nfrom vdifs.model import zeros\n")
    plant(copied, "vdifs/model/zeros.py",
          "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sizes import parse_size\n")
    plant(copied, "vdifs/wire/rpc.py", "\nfrom vdifs.wire.frames import _planted_secret\n")
    planted = layering.read_package(copied)

    new_layers = set(layering.layer_violations(planted)) - before_layers
    assert len(new_layers) == 1
    assert next(iter(new_layers)).startswith("vdifs.store.objects:")
    assert "imports vdifs.cli.planted (store -> cli)" in next(iter(new_layers))

    new_cycles = [c for c in layering.import_cycles(planted) if c not in before_cycles]
    assert new_cycles == [["vdifs.model.sizes", "vdifs.model.zeros"]]
    assert any("vdifs.model.sizes -> vdifs.model.zeros -> vdifs.model.sizes" in d
               for d in layering.describe_cycles(planted))

    new_private = set(layering.private_imports(planted)) - before_private
    assert len(new_private) == 1
    assert "vdifs.wire.rpc:" in next(iter(new_private))
    assert "vdifs.wire.frames._planted_secret" in next(iter(new_private))


def test_a_cycle_through_three_modules_names_all_three(copied: str) -> None:
    plant(copied, "vdifs/model/ids.py", "\nimport vdifs.model.names\n")
    plant(copied, "vdifs/model/names.py", "\nfrom vdifs.model import sizes as _sizes\n")
    plant(copied, "vdifs/model/sizes.py", "\nfrom . import ids\n")
    pkg = layering.read_package(copied)
    assert ["vdifs.model.ids", "vdifs.model.names", "vdifs.model.sizes"] in layering.import_cycles(pkg)


def test_a_package_outside_the_table_is_reported(copied: str) -> None:
    os.mkdir(os.path.join(copied, "vdifs", "extra"))
    plant(copied, "vdifs/extra/__init__.py", "")
    plant(copied, "vdifs/model/ids.py", "\ndef _planted() -> None:\n    from vdifs import extra\n")
    found = layering.layer_violations(layering.read_package(copied))
    assert "vdifs.extra: in no layer of the table" in found
    assert any(f.startswith("vdifs.model.ids:") and "(model -> no layer)" in f for f in found)
