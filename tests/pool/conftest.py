import os

import pytest

from vdifs.client.catalog import Catalog
from vdifs.client.local import LocalPool, file_registers
from vdifs.meta.directory_service import DirectoryService
from vdifs.store.objects import ObjectStore


def make_catalog(root: str) -> Catalog:
    store = ObjectStore(root)
    store.open()
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    return Catalog(LocalPool(store), DirectoryService(file_registers(os.path.join(root, "meta"))))


@pytest.fixture
def store_dir(tmp_path):
    return str(tmp_path / "store")
