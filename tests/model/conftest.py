"""Fixtures for model tests: real radiographs from pydicom-data / deid-data, small networks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest


def _pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"pydicom test file {name!r} is missing (install the 'test' extra: pydicom-data).")
    return Path(path)


@pytest.fixture(scope="session")
def rg1_uncr_path() -> Path:
    return _pydicom_file("RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def rg1_j2kr_path() -> Path:
    return _pydicom_file("RG1_J2KR.dcm")


@pytest.fixture(scope="session")
def rg1_j2ki_path() -> Path:
    return _pydicom_file("RG1_J2KI.dcm")


@pytest.fixture(scope="session")
def cr_16x16_path() -> Path:
    return _pydicom_file("dicomdirtests/77654033/CR1/6154")


@pytest.fixture(scope="session")
def cat_path() -> Path:
    import deid_data

    path = Path(os.path.dirname(deid_data.__file__)) / "data" / "animals" / "cat.dcm"
    if not path.is_file():
        pytest.fail(f"deid-data file {path} is missing (install the 'test' extra: deid-data).")
    return path


@pytest.fixture(scope="session")
def rg1_uncr(rg1_uncr_path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(rg1_uncr_path)


@pytest.fixture(scope="session")
def cat(cat_path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(cat_path)


@pytest.fixture(scope="session")
def cr_16x16(cr_16x16_path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(cr_16x16_path)


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core runner, 2 spinning OpenMP threads compete
    with other processes and small forwards slow down a hundredfold."""
    try:
        import torch
    except ImportError:  # preprocessing tests do not need torch
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="package")
def _onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep ONNX exports made by tests out of the user's cache."""
    before = os.environ.get("PTX_MODEL_CACHE_DIR")
    os.environ["PTX_MODEL_CACHE_DIR"] = str(tmp_path_factory.mktemp("onnx-cache"))
    yield
    if before is None:
        os.environ.pop("PTX_MODEL_CACHE_DIR", None)
    else:
        os.environ["PTX_MODEL_CACHE_DIR"] = before


def require_onnxruntime() -> None:
    """ONNX Runtime is a dependency: skip without it, unless required."""
    from model.runtime import onnxruntime_available

    if onnxruntime_available():
        return
    if os.environ.get("PTX_REQUIRE_SERVICES") == "1":
        pytest.fail("onnxruntime is not installed and PTX_REQUIRE_SERVICES=1.")
    pytest.skip("onnxruntime is not installed.")
