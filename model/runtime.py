"""Execution backends for a segmentation network: logits = run(batch).

- ``TorchRunner``: PyTorch, channels-last, inference mode; on CUDA bf16 autocast and an
  optional ``torch.compile`` on fixed batch shapes.
- ``OnnxRuntimeRunner``: the CPU default (``onnxruntime`` is a dependency; without it
  PyTorch serves); the network is exported locally once per (weights, input size) and
  cached on disk. Measured in bench/RESULTS.md; outputs match PyTorch fp32 within 1e-4.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

__all__ = [
    "OnnxRuntimeRunner",
    "Runner",
    "RuntimeName",
    "TorchRunner",
    "make_runner",
    "onnxruntime_available",
]

log = logging.getLogger(__name__)

#: Documented CPU tolerance: max abs probability difference of a runtime vs PyTorch fp32.
CPU_RUNTIME_PROB_TOLERANCE = 1e-4
ONNX_OPSET = 17


class RuntimeName(StrEnum):
    AUTO = "auto"  # onnxruntime on CPU when installed, else torch
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"


class Runner(Protocol):
    name: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) float32 CPU/device tensor -> (N, classes, S, S) float32 logits."""
        ...


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class TorchRunner:
    """PyTorch eager (or compiled) execution."""

    def __init__(
        self,
        network: nn.Module,
        device: torch.device,
        *,
        compile: bool = False,
        fixed_batch: int | None = None,
    ) -> None:
        self.device = device
        self.network = network.to(device).eval().to(memory_format=torch.channels_last)
        self._use_autocast = device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels once
        self._forward = self.network
        self.compiled = bool(compile)
        # Compiled graphs (and CUDA graphs) want one shape: pad every call to fixed_batch.
        self.fixed_batch = fixed_batch if compile else None
        if compile:
            # Default inductor mode: max-autotune takes many minutes to compile UNet++/B4.
            self._forward = torch.compile(self.network, dynamic=False)
        self.name = "torch-compile" if compile else "torch"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.to(self.device, non_blocking=True)
        if self.fixed_batch is not None and n < self.fixed_batch:
            x = torch.cat([x, x.new_zeros((self.fixed_batch - n, *x.shape[1:]))], dim=0)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self._use_autocast:
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                    out = self._forward(x)
            else:
                out = self._forward(x)
        return out[:n].float()


def _default_cache_dir() -> Path:
    configured = os.environ.get("PTX_MODEL_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ptx-node" / "onnx"


def _network_key(network: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Identifies the exported graph: weights, module structure, input shape, exporter."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    digest = hashlib.sha256(save(state))
    digest.update(repr(network).encode())
    digest.update(f"{input_shape}|{torch.__version__}|opset{ONNX_OPSET}".encode())
    return digest.hexdigest()[:32]


def export_onnx(network: nn.Module, input_shape: tuple[int, int, int]) -> bytes:
    """Export ``network`` (eval mode, CPU) to ONNX with a dynamic batch axis."""
    channels, height, width = input_shape
    example = torch.zeros((2, channels, height, width), dtype=torch.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter is chatty about tracing
        torch.onnx.export(
            network,
            (example,),
            buffer,
            input_names=["image"],
            output_names=["logits"],
            opset_version=ONNX_OPSET,
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return buffer.getvalue()


def _cached_onnx(network: nn.Module, input_shape: tuple[int, int, int], cache_dir: Path | None) -> bytes:
    cache_dir = cache_dir or _default_cache_dir()
    path = cache_dir / f"{_network_key(network, input_shape)}.onnx"
    try:
        return path.read_bytes()
    except OSError:
        pass
    data = export_onnx(network, input_shape)
    try:  # the cache is an optimization: a read-only home must not stop inference
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".onnx-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other worker users may share the cache
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("Could not cache the ONNX export in %s: %s", cache_dir, exc)
    return data


class OnnxRuntimeRunner:
    """ONNX Runtime CPU execution of a locally exported network (no downloads)."""

    name = "onnxruntime"

    def __init__(
        self,
        network: nn.Module,
        input_shape: tuple[int, int, int],
        *,
        num_threads: int,
        cache_dir: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        network = network.to("cpu").eval()
        # Export from an NCHW copy: channels-last strides are irrelevant to the graph.
        model_bytes = _cached_onnx(network, input_shape, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # No busy-waiting threads: a node shares its cores with the SCP, Celery and the database
        # (measured under load: 2.97 s vs 3.92 s per TTA pair at 512 with spinning on).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.input_shape = input_shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"This ONNX session expects inputs (N, {self.input_shape}), got {tuple(x.shape)}.")
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(["logits"], {"image": array})
        return torch.from_numpy(logits)


def make_runner(
    runtime: RuntimeName | str,
    network: nn.Module,
    device: torch.device,
    *,
    input_shape: tuple[int, int, int],
    num_threads: int | None = None,
    compile: bool = False,
    fixed_batch: int | None = None,
    cache_dir: Path | None = None,
) -> Runner:
    """Pick the execution backend; ``auto`` falls back to PyTorch if ONNX Runtime fails."""
    try:
        runtime = RuntimeName(runtime)
    except ValueError:
        valid = ", ".join(r.value for r in RuntimeName)
        raise ValueError(f"runtime must be one of {valid}; got {runtime!r}.") from None
    if runtime is RuntimeName.ONNXRUNTIME and device.type != "cpu":
        raise ValueError("runtime 'onnxruntime' is the CPU path; use 'torch' (or 'auto') on CUDA.")
    want_ort = runtime is RuntimeName.ONNXRUNTIME or (
        runtime is RuntimeName.AUTO and device.type == "cpu" and not compile and onnxruntime_available()
    )
    if want_ort:
        threads = num_threads or torch.get_num_threads()
        try:
            return OnnxRuntimeRunner(network, input_shape, num_threads=threads, cache_dir=cache_dir)
        except Exception as exc:
            if runtime is RuntimeName.ONNXRUNTIME:
                raise
            log.warning("ONNX Runtime path unavailable (%s); falling back to PyTorch.", exc)
    return TorchRunner(network, device, compile=compile, fixed_batch=fixed_batch)
