"""Loading a model the gateway ships as ONNX: its config, its checked files, and the
execution provider that runs it (CUDA when a GPU is usable, the CPU otherwise).

The router classifier and the semantic cache's verifier load through here, so both
report the same way which provider runs them and why not CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_INTRA_OP_THREADS",
    "ArtifactError",
    "OnnxModel",
    "cgroup_cpu_quota",
    "cpu_count",
    "intra_op_threads_for",
    "load_onnx_model",
    "sha256_file",
]

_CGROUP_ROOT = Path("/sys/fs/cgroup")

MAX_INTRA_OP_THREADS = 8
"""A pass is one prompt's small window: past a few threads, waking them costs more than the
split work saves. On a 16-core machine the router's 96-token pass took 6.1 ms p50 on 8 threads
and 15.9 ms on all 16 (2026-12-04, one run of ``tests/bench/classifier_bench.py --threads``)."""


class ArtifactError(Exception):
    """The artifacts cannot be used; ``reason`` is a short word for the log, ``details`` the rest."""

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


@dataclass(frozen=True, slots=True)
class OnnxModel:
    session: Any
    tokenizer: Any
    config: dict[str, Any]
    model_file: str
    version: str
    """The model file's sha256, first 16 hex digits."""
    provider: str
    why_not_cuda: str | None
    threads: int
    """onnxruntime's intra-op threads for this session."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cpu_count(cgroup_root: Path = _CGROUP_ROOT) -> int:
    """The cores this process may use: its CPU affinity, or its container's CPU quota when
    that is fewer (a pod limited to 2 CPUs on a 64-core node sees all 64 in its affinity)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return cores if quota is None else min(cores, quota)


def cgroup_cpu_quota(root: Path = _CGROUP_ROOT) -> int | None:
    """The CPUs the cgroup's CFS quota allows, rounded up (cgroup v2 ``cpu.max``, else v1's
    ``cpu.cfs_quota_us``); None when unlimited or not readable. Reads the cgroup namespace's
    root, which is the container's own cgroup under Docker and Kubernetes."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        allowed, per = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    if allowed <= 0 or per <= 0:  # v1's -1: no quota
        return None
    return max(1, math.ceil(allowed / per))


def intra_op_threads_for(workers: int = 1) -> int:
    """Each worker's share of the cores this process may use, at most :data:`MAX_INTRA_OP_THREADS`."""
    return max(1, min(MAX_INTRA_OP_THREADS, cpu_count() // max(1, workers)))


def load_onnx_model(
    directory: str | Path,
    *,
    prefer_gpu: bool = True,
    variant: str | None = None,
    intra_op_threads: int | None = None,
) -> OnnxModel:
    """The session and tokenizer described by ``directory/config.json``.

    ``config["files"]`` maps variants ("int8", "fp32", ...) and "tokenizer" to file names,
    ``config["sha256"]`` their digests (checked), ``cpu_variant`` and optionally
    ``gpu_variant`` the defaults. ``intra_op_threads`` defaults to :func:`intra_op_threads_for`
    one worker. Raises :class:`ArtifactError`.
    """
    d = Path(directory)
    config_path = d / "config.json"
    if not config_path.is_file():
        raise ArtifactError("missing", path=str(config_path))
    try:
        config = json.loads(config_path.read_text())
        files: dict[str, str] = config["files"]
        hashes: dict[str, str] = config.get("sha256", {})
        int(config["max_tokens"])
        cpu_variant = config["cpu_variant"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError("bad_config", path=str(config_path), error=repr(exc)) from None

    # onnxruntime 1.31 starts Microsoft telemetry at import, writing a device id and an event
    # database under $HOME/.cache: off, by the variable it reads then (the call alone is too late).
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort
    from tokenizers import Tokenizer

    ort.disable_telemetry_events()

    why_not_cuda = _cuda_probe(ort) if prefer_gpu else "not requested"
    use_gpu = why_not_cuda is None
    if variant is None:
        variant = config.get("gpu_variant", cpu_variant) if use_gpu else cpu_variant
    if variant not in files:
        raise ArtifactError("unknown_variant", variant=variant)
    model_path = d / files[variant]
    tokenizer_path = d / files.get("tokenizer", "tokenizer.json")
    for path in (model_path, tokenizer_path):
        if not path.is_file():
            raise ArtifactError("missing", path=str(path))
        want = hashes.get(path.name)
        if want is not None and (got := sha256_file(path)) != want:
            raise ArtifactError("sha256_mismatch", path=str(path), expected=want, actual=got)

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = intra_op_threads or intra_op_threads_for(1)
    so.intra_op_num_threads = threads
    # Idle ONNX threads must not spin: they would take CPU from the event loop and the
    # other processes on a small machine (measured: embedding p50 12-16 ms -> ~6.5 ms under load).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    providers: list[Any] = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_gpu else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:
        raise ArtifactError("load_failed", path=str(d), error=repr(exc)) from None
    version = hashes.get(model_path.name) or sha256_file(model_path)
    return OnnxModel(
        session=session,
        tokenizer=tokenizer,
        config=config,
        model_file=model_path.name,
        version=version[:16],
        provider=session.get_providers()[0],
        why_not_cuda=why_not_cuda,
        threads=threads,
    )


def _cuda_probe(ort: Any) -> str | None:
    """None when the CUDA provider can start here; otherwise why not, found quietly.

    ``onnxruntime-gpu`` lists the CUDA provider on every machine and, asked for it where
    the driver or CUDA's libraries are missing, prints a red error on each start. Loading
    the driver and the provider's own library first answers the same question in silence.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1)"
    provider_library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(provider_library))
    except OSError:
        pass
    else:
        return None
    # ``pip install onnxruntime-gpu[cuda,cudnn]`` puts CUDA's libraries in site-packages/nvidia,
    # where the loader does not look; onnxruntime's own preload finds them there (and prints
    # its findings, which a service's stdout does not want).
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            preload()
    try:
        ctypes.CDLL(str(provider_library))
    except OSError as exc:
        return f"CUDA libraries missing ({str(exc).split(':')[0]})"
    return None
