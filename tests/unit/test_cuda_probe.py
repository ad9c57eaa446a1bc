"""The CUDA probe finds CUDA's libraries where ``pip install onnxruntime-gpu[cuda,cudnn]`` puts
them (site-packages/nvidia, off the loader's path) through onnxruntime's own preload.

No GPU here: the loader is replaced at the OS boundary (``ctypes.CDLL``) by one that, like the
real one, cannot resolve the provider library until CUDA's libraries are loaded."""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import inference


def _fake_ort(tmp_path: Path, preloaded: list[bool], helps: bool) -> Any:
    (tmp_path / "capi").mkdir()

    def preload_dlls() -> None:
        print("Failed to load libcudnn.so.9: not found")  # what onnxruntime prints
        preloaded.append(True)
        if not helps:
            raise RuntimeError("no nvidia packages")

    return SimpleNamespace(
        __file__=str(tmp_path / "__init__.py"),
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        preload_dlls=preload_dlls,
    )


def _loader(preloaded: list[bool], helps: bool) -> Any:
    def cdll(name: str) -> object:
        if name.endswith("libonnxruntime_providers_cuda.so") and not (preloaded and helps):
            raise OSError("libcublasLt.so.13: cannot open shared object file: No such file or directory")
        return object()

    return cdll


@pytest.mark.parametrize("helps", [True, False])
def test_the_probe_preloads_cuda_libraries_from_site_packages_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], helps: bool
) -> None:
    preloaded: list[bool] = []
    monkeypatch.setattr(ctypes, "CDLL", _loader(preloaded, helps))

    why_not = inference._cuda_probe(_fake_ort(tmp_path, preloaded, helps))

    assert preloaded == [True]
    assert why_not == (None if helps else "CUDA libraries missing (libcublasLt.so.13)")
    assert capsys.readouterr().out == ""


def test_a_build_without_the_cuda_provider_is_named_without_loading_anything(tmp_path: Path) -> None:
    ort = SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"])
    assert inference._cuda_probe(ort) == "this onnxruntime build has no CUDA provider"
