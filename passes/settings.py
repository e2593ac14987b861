"""The settings of every pass, each declared once (:func:`passes.options.option`).

Each declaration gives a pass its keyword arguments and their checks, the keys its recipe
entries take, the flags of its CLI verb, and the settings its manifests record. Adding an
option here adds all four. Light on purpose (no onnx, no numpy): the CLI reads it at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from converter.core import defaults
from converter.core.machine import Target
from passes.options import NoSettings, PassSettings, option

__all__ = [
    "PruneSettings",
    "Int8Settings",
    "StaticQuantizeSettings",
    "Float16Settings",
    "SmoothSettings",
    "PackSettings",
    "NoSettings",
    "TARGET_HELP",
    "DEFAULT_ALPHA",
    "DEFAULT_CHUNK",
    "BIAS_CORRECTION_SAMPLES",
]

TARGET_HELP = (
    "CPU kind the int8 model is for: host (default, read from this CPU's flags), avx2 (x86 "
    "without VNNI, incl. AVX-512F: 7-bit weights), avx512-vnni (AVX512-VNNI or AVX-VNNI: full "
    "8-bit weights), arm64 (full 8-bit weights)"
)
DEFAULT_ALPHA = 0.5
DEFAULT_CHUNK = 1 << 19  # elements decoded per chunk (see passes/pack.py)
BIAS_CORRECTION_SAMPLES = 64  # calibration samples bias correction measures on


@dataclass(frozen=True)
class PruneSettings(PassSettings):
    """MagnitudePrune (``onnxship prune``)."""

    sparsity: float = option(
        help="fraction of the eligible weights to zero, in [0, 1)",
        low=0.0, high=1.0, high_open=True, metavar="S",
    )  # fmt: skip
    scope: str = option(
        defaults.DEFAULT_PRUNE_SCOPE,
        "one threshold over all weights, or S per tensor",
        choices=defaults.PRUNE_SCOPES,
    )
    exclude: tuple[str, ...] = option(
        (),
        "skip weights whose initializer or node name matches",
        metavar="REGEX",
    )
    min_params: int = option(
        defaults.DEFAULT_MIN_PARAMS,
        "skip tensors with fewer than N elements",
        low=0,
        metavar="N",
    )
    skip_first_last: bool = option(False, "leave the first and the last weighted layer dense")


@dataclass(frozen=True, kw_only=True)
class Int8Settings(PassSettings):
    """What both int8 passes take: DynamicQuantize's settings, and the ``both modes`` flags
    of ``onnxship quantize``."""

    weight_type: str = option("int8", "weight type", choices=defaults.QUANT_TYPES)
    per_channel: bool = option(
        True,
        "one scale per output channel of each weight",
        off_flag="--per-tensor",
        off_help="one scale per weight tensor instead of per output channel",
    )
    target: str | Target = option(
        "host", TARGET_HELP, flag="--target", metavar="TARGET", default_text=""
    )
    reduce_range: bool | None = option(None, "7-bit weights on/off, overriding the target's choice")
    exclude: tuple[str, ...] = option((), "keep nodes whose name matches in fp32", metavar="REGEX")
    exclude_ops: tuple[str, ...] = option(
        (), "keep every node of this op type in fp32", flag="--exclude-op", metavar="TYPE"
    )
    nodes_to_exclude: tuple[str, ...] = option(
        (), "node names kept in fp32, exactly (no pattern)", cli=False
    )
    preprocess: bool = option(
        True,
        "run onnxruntime's quant_pre_process (shape inference + optimization) first",
        off_flag="--no-preprocess",
        off_help="skip quant_pre_process (shape inference + optimization)",
    )


@dataclass(frozen=True)
class StaticQuantizeSettings(Int8Settings):
    """StaticQuantize: the int8 settings, and the ``static mode`` flags of ``quantize``."""

    calibration: str | os.PathLike | None = option(
        None,
        "calibration data: .npz or folder",
        flag="--calib",
        metavar="DATA",
        calibration=True,
    )
    ranges: Any = option(
        None,
        "ranges of an earlier StaticQuantize.calibrate (the object, or the file it saved), "
        "instead of calibration data",
        cli=False,
        reuses_calibration=True,
    )
    calib_method: str | None = option(
        None,
        "how ranges are chosen",
        choices=defaults.CALIB_METHODS,
        default_text="mse; mean_minmax with --scheme transformer",
    )
    calib_samples: int | None = option(
        None, "use the first N samples", low=1, metavar="N", default_text="all"
    )
    calib_batch_size: int = option(
        defaults.DEFAULT_CALIB_BATCH, "samples per calibration batch", low=1, metavar="N"
    )
    format: str = option("qdq", "graph format", choices=defaults.QUANT_FORMATS)
    scheme: str = option(
        "auto",
        "transformer: Q/DQ on MatMul/Gemm inputs only, mean_minmax ranges; default: every "
        "supported op; auto (the default): transformer when the model has MatMul, Softmax and "
        "a layer norm, else default",
        choices=defaults.QUANT_SCHEMES,
        default_text="",
    )
    activation_type: str = option("uint8", "activation type", choices=defaults.QUANT_TYPES)
    weight_rounding: str = option(
        "nearest",
        "gptq: round weights to keep each MatMul's output on the calibration data, not "
        "each weight, closest (GPTQ; same graph and speed; default nearest)",
        choices=defaults.WEIGHT_ROUNDINGS,
        default_text="",
    )
    equalize: bool = option(
        True,
        "stretch the channels of each activation read by a depthwise Conv towards the "
        "tensor's range, scaling the Convs around it (float model unchanged; default scheme)",
        off_flag="--no-equalize",
        off_help="leave activation channels as they are (no equalization into depthwise Convs)",
    )
    bias_correction: bool | None = option(
        None,
        "shift each quantized Conv/Gemm bias so its mean output per channel on the first "
        f"{BIAS_CORRECTION_SAMPLES} calibration samples matches the float model's (empirical "
        "bias correction; needs the calibration data, also with reused ranges; default: on "
        "with the default scheme when calibration data is given)",
    )
    stem_rounding: bool | None = option(
        None,
        "GPTQ rounding for the Convs that read the model input (the stem; im2col XᵀX of the "
        f"first {BIAS_CORRECTION_SAMPLES} calibration samples; same graph and speed; default: "
        "on with the default scheme when calibration data is given)",
    )
    progress: bool = option(True, "show a progress bar while calibrating", cli=False)


@dataclass(frozen=True)
class Float16Settings(PassSettings):
    """Float16 (``onnxship fp16``)."""

    keep_io_types: bool = option(
        True,
        "keep float32 inputs and outputs",
        flag="--keep-io-types",
        off_flag="--fp16-io",
        off_help="make the float inputs and outputs float16 too",
    )
    block_ops: tuple[str, ...] | None = option(
        None, "op types kept in fp32, replacing the default block list", cli=False
    )
    extra_block_ops: tuple[str, ...] = option(
        (), "also keep this op type in fp32", flag="--block-op", metavar="TYPE"
    )
    block_nodes: tuple[str, ...] = option(
        (), "keep nodes whose name matches in fp32", flag="--block-node", metavar="REGEX"
    )


@dataclass(frozen=True)
class SmoothSettings(PassSettings):
    """SmoothQuant (recipes and ``auto`` only: no verb of its own)."""

    calibration: str | os.PathLike | None = option(
        None,
        "calibration data (the static quantization's): .npz or folder",
        flag="--calib",
        metavar="DATA",
        calibration=True,
    )
    alpha: float = option(
        DEFAULT_ALPHA,
        "how much of the activation range moves into the weights",
        low=0.0,
        high=1.0,
    )
    calib_samples: int = option(128, "use the first N samples", low=1, metavar="N")
    batch_size: int = option(16, "samples per batch", low=1, metavar="N")
    fold_layernorm: bool = option(
        True, "fold the division into a LayerNormalization writing the input"
    )


@dataclass(frozen=True)
class PackSettings(PassSettings):
    """Pack (``onnxship pack``)."""

    min_saved_bytes: int = option(
        1024, "pack a weight only when that saves at least N bytes", low=1, metavar="N"
    )
    chunk: int = option(
        DEFAULT_CHUNK, "elements decoded per chunk (tests use small ones)", low=1, cli=False
    )
