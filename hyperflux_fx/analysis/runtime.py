"""What the target runtime's fast kernels need, found by asking the runtime (ONNX Runtime, CPU).

ONNX Runtime's CPU provider rewrites convolutions into a blocked channel layout (NCHWc: 8 channels
per block with AVX2, 16 with AVX-512F) and keeps a chain of convs in that layout. A conv reading
fewer channels than one block breaks the chain (the tensor is reordered back to NCHW and the conv
takes a slow path), and widths that are not a multiple of the block are padded up to one, so the
padding is computed anyway. :func:`nchwc_block` finds the block by letting ORT optimise
``conv(32 -> C) -> conv(C -> 32)`` for C = 4, 8, 16, 32 and reading, in the optimised graph, the
smallest C for which the chain stays blocked; ``FoldConfig(round_to="auto")`` keeps every deleted
group of conv channels at a multiple of it (so at least one block): what the kernels would compute
anyway. Only 2-D convs are rewritten so; ORT runs GEMMs and MatMuls in the plain layout, where a width
rounded up to a multiple of 8 or 16 is never faster (measured side by side by
``tools/bench_rounding.py``), so ``round_to_width="auto"`` (linear widths) resolves to 1.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from hyperflux_fx.config import CONV_FLOOR, FoldConfig

__all__ = ["cpu_isa", "cpu_name", "machine_key", "nchwc_block", "resolve_fold_config"]

log = logging.getLogger(__name__)

NCHWC_DOMAIN = "com.microsoft.nchwc"


def _chain_model(channels: int) -> bytes:
    """``conv(32 -> channels) -> conv(channels -> 32)``, 3x3, as a serialized ONNX model."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = [numpy_helper.from_array(np.ones((channels, 32, 3, 3), np.float32), "w1"),
               numpy_helper.from_array(np.ones((32, channels, 3, 3), np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["y"], pads=[1, 1, 1, 1])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 32, 8, 8]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "nchwc_probe", io[:1], io[1:], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _optimized_ops(model: bytes) -> list[tuple[str, str]]:
    """(domain, op type) of every node of ``model`` after ORT's full CPU graph optimisation."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(out)
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3  # the "hardware specific optimizations" notice is the point here
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return [(n.domain, n.op_type) for n in onnx.load(str(out)).graph.node]


def _chain_stays_blocked(channels: int) -> bool | None:
    """True: both convs run blocked with no reorder between them; None: ORT used no NCHWc at all."""
    ops = _optimized_ops(_chain_model(channels))
    blocked = [op for domain, op in ops if domain == NCHWC_DOMAIN]
    if not blocked:
        return None
    return blocked.count("Conv") == 2 and blocked.count("ReorderOutput") == 1


@functools.cache
def nchwc_block() -> int:
    """ONNX Runtime's NCHWc block on this CPU (8 or 16), or 0 when it does not use the blocked layout
    (or ONNX Runtime is missing)."""
    try:
        for channels in (4, 8, 16, 32):
            stays = _chain_stays_blocked(channels)
            if stays is None:
                log.info("ONNX Runtime rewrites no conv into NCHWc on this CPU: no rounding needed for it")
                return 0
            if stays:
                log.info("ONNX Runtime's NCHWc block on this CPU: %d channels", channels)
                return channels
    except ImportError:
        log.info("onnxruntime is not installed: no NCHWc block to round to")
        return 0
    return 0


def resolve_fold_config(config: FoldConfig) -> FoldConfig:
    """``config`` with ``"auto"`` replaced by the multiples the runtime's kernels need: ``round_to`` the
    NCHWc block (1 where there is none), ``round_to_width`` 1, ``min_conv_channels`` :data:`CONV_FLOOR`
    (an explicit ``round_to`` has already made it 1: FoldConfig)."""
    if config.min_conv_channels == "auto":
        config = dataclasses.replace(config, min_conv_channels=CONV_FLOOR)
    if config.round_to == "auto":
        config = dataclasses.replace(config, round_to=nchwc_block() or 1)
    if config.round_to_width == "auto":
        config = dataclasses.replace(config, round_to_width=1)
    return config


# CPU features that decide which kernels ONNX Runtime's MLAS runs (x86: /proc/cpuinfo "flags"; Arm:
# "Features", where asimd is NEON)
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
             "amx_bf16", "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = (part.strip() for part in line.split(":", 1))
                fields.setdefault(key, value)
    except OSError:
        pass
    return fields


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def cpu_name() -> str:
    """The CPU's model name: /proc/cpuinfo, sysctl on macOS (Apple M1, M2, ...), else the platform's."""
    info = _cpuinfo()
    name = info.get("model name") or info.get("Model") or info.get("Hardware")
    if not name and platform.system() == "Darwin":
        name = _sysctl("machdep.cpu.brand_string")
    return name or platform.processor() or platform.machine()


@functools.cache
def cpu_isa() -> tuple[str, ...]:
    """The instruction-set features of :data:`ISA_FLAGS` this CPU has (sorted). Apple silicon has NEON
    (asimd) and, from M2 on, bf16 and i8mm, which sysctl reports."""
    info = _cpuinfo()
    present = set((info.get("flags") or info.get("Features") or "").split())
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        present.add("asimd")
        present |= {f for f in ("bf16", "i8mm") if _sysctl(f"hw.optional.arm.FEAT_{f.upper()}") == "1"}
    return tuple(sorted(f for f in ISA_FLAGS if f in present))


def machine_key(threads: int = 1) -> dict[str, Any]:
    """What decides ONNX Runtime's CPU kernels, so what a latency measurement holds for: the CPU's name
    and instruction-set features, the intra-op threads, the ORT version and its NCHWc block."""
    try:
        import onnxruntime as ort

        version = ort.__version__
    except ImportError:
        version = None
    return {"cpu": cpu_name(), "isa": list(cpu_isa()), "machine": platform.machine(), "threads": threads,
            "ort": version, "nchwc_block": nchwc_block()}
