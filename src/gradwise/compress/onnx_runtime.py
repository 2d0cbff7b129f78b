"""The ONNX Runtime backend: export a model, quantize the graph, run it as an ``nn.Module``.

``export_onnx`` uses the ``torch.export``-based exporter that torch 2.13
recommends (``dynamo=True``); ``quantize_onnx`` uses onnxruntime's own
quantization tools; :class:`OnnxModule` wraps an ``InferenceSession`` so that
:func:`gradwise.train.evaluate.evaluate` and :func:`gradwise.compress.measure.measure`
treat it like any other model. onnx and onnxruntime are imported inside the
functions: most runs never need them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from gradwise.data.readers import first_line
from gradwise.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from gradwise.compress.quantize import QuantizeSpec

INPUT_NAME = "x"
OUTPUT_NAME = "logits"
# Only the Linear layers (MatMul/Gemm in the graph) are quantized, as on the torchao path, so both
# backends quantize the same weights and their numbers compare.
QUANTIZED_OPS = ["MatMul", "Gemm"]
# ONNX TensorProto element types that hold weights (float16/32/64, bfloat16, int8/uint8, int4/uint4, and int32
# for biases that static quantization stores as int32).
_WEIGHT_TYPES = {1, 2, 3, 6, 10, 11, 16, 21, 22}
# Quantization parameters are initializers too, but not weights.
_QPARAM_SUFFIXES = ("scale", "scales", "zero_point", "zero_points", "_zp")


@contextmanager
def _quiet_tools() -> Iterator[None]:
    """Silence what the exporter and the quantizer print on every call but a user cannot act on.

    The exporter logs one line per torchvision op it cannot register and torch warns about its own
    pytree internals; onnxruntime's quantizer logs "consider pre-processing" through the root logger.
    Errors still show.
    """
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# torch.onnx colours its messages for a terminal; a one-line error shows the text alone.
ANSI_ESCAPE = r"\x1b\[[0-9;]*m"


def _tmp_path(file: Path) -> Path:
    return file.with_name(f".{file.name}.tmp-{os.getpid()}")


def export_onnx(model: nn.Module, example_input: torch.Tensor, file: Path) -> Path:
    """Export ``model`` (eval mode) to ``file`` with a dynamic batch axis (and sequence axis for token ids).

    ``torch.export`` specializes any axis of size 1, so a one-row example is doubled before tracing.
    Input is named ``x`` and output ``logits``; the file is self-contained (no external data).
    """
    from torch.export import Dim

    file = Path(file)
    x = example_input
    if x.shape[0] < 2:
        x = x.repeat(2, *([1] * (x.dim() - 1)))
    axes: dict[int, Any] = {0: Dim.AUTO}
    if not x.is_floating_point() and x.dim() > 1:
        axes[1] = Dim.AUTO  # token ids: padded per batch, so the sequence length varies too
    was_training = model.training
    model.eval()
    tmp = _tmp_path(file)
    with _quiet_tools():
        try:
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=(axes,),
                external_data=False,
                verbose=False,
            )
            os.replace(tmp, file)
        except Exception as exc:
            if isinstance(exc, (KeyboardInterrupt, OSError)):
                raise
            raise ConfigError(
                f"quantize: torch.onnx cannot export {type(model).__name__} ({type(exc).__name__}: "
                f"{re.sub(ANSI_ESCAPE, '', first_line(exc))}); use quantize.backend=torchao for this model"
            ) from None
        finally:
            model.train(was_training)
            tmp.unlink(missing_ok=True)
    return file


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a list of input batches."""

    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self._iter: Iterator[np.ndarray] = iter(batches)
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self._name: batch}

    def rewind(self) -> None:  # part of the protocol; one pass is all quantize_static takes
        pass


def quantize_onnx(src: Path, dst: Path, spec: QuantizeSpec, calibration: list[np.ndarray] | None = None) -> Path:
    """Quantize the ONNX graph ``src`` into ``dst`` with onnxruntime.quantization.

    ``dynamic``: int8 weights (per output channel, symmetric) and activations quantized per call
    (quantize_dynamic). ``static``: int8 weights and uint8 activations with ranges from the
    ``calibration`` batches (quantize_static, MinMax, QOperator format: QLinearMatMul/QGemm
    nodes, which ran the MiniLM classifier 1.5-1.8x faster than QDQ at batch 64 on this CPU).
    ``weight_only``: block-wise 4- or 8-bit weights in MatMulNBits nodes (``group_size`` columns per
    block) with float activations.

    References:
        Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
        Integer-Arithmetic-Only Inference".

    Raises:
        ConfigError: static quantization without calibration batches.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    src, dst = Path(src), Path(dst)
    tmp = _tmp_path(dst)
    with _quiet_tools():
        try:
            if spec.method == "none":  # the fp32 graph as exported: ONNX Runtime's own speed, no int8
                shutil.copyfile(src, tmp)
            elif spec.method == "dynamic":
                quantize_dynamic(
                    src, tmp, op_types_to_quantize=QUANTIZED_OPS, per_channel=True, weight_type=QuantType.QInt8
                )
            elif spec.method == "static":
                if not calibration:
                    raise ConfigError("quantize.method 'static' needs calibration batches (calibration_samples)")
                quantize_static(
                    src,
                    tmp,
                    _Calibration(calibration, INPUT_NAME),
                    quant_format=QuantFormat.QOperator,
                    op_types_to_quantize=QUANTIZED_OPS,
                    per_channel=True,
                    # This CPU has VNNI (the onnxruntime docs' case for uint8 activations without reduce_range).
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                )
            else:
                _weight_only(src, tmp, spec)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    return dst


def _weight_only(src: Path, dst: Path, spec: QuantizeSpec) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        _gemm_to_matmul(onnx.load(str(src))),
        bits=spec.bits,
        block_size=spec.group_size,
        is_symmetric=True,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def _gemm_to_matmul(model: Any) -> Any:
    """Rewrite ``Gemm(x, W, b)`` with a constant ``W`` as ``MatMul(x, Wᵀ) + b``: MatMulNBits replaces MatMul only.

    The exporter turns a Linear on 2-D input into Gemm (weight transposed, transB=1); on 3-D input into MatMul.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in weights or not plain:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        name = f"{node.input[1]}_matmul"
        graph.initializer.append(numpy_helper.from_array(weight.T.copy() if attrs.get("transB", 0) else weight, name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    used = {name for node in nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind ``nn.Module.forward``: ``x`` in, a torch tensor of outputs out.

    Args:
        file: The ``.onnx`` file (from :func:`export_onnx` or :func:`quantize_onnx`).
        threads: Intra-op threads of the session; None lets onnxruntime choose (one per core).

    Raises:
        CheckpointError: the file is missing or not a model onnxruntime can load.
    """

    def __init__(self, file: Path, threads: int | None = None) -> None:
        super().__init__()
        self.file = Path(file)
        self.threads = threads
        # evaluate() and measure() take the input dtype from the first parameter; the graph's inputs are float32.
        self._dtype_anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        self._session = self._new_session()

    def _new_session(self) -> Any:
        import onnxruntime as ort

        if not self.file.is_file():
            raise CheckpointError(f"{self.file}: ONNX model file is missing")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or 0
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(self.file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CheckpointError(f"{self.file}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
        inputs = session.get_inputs()
        self._input_name = inputs[0].name
        self._input_dtype = np.int64 if "int64" in inputs[0].type else np.float32
        return session

    def set_threads(self, threads: int | None) -> None:
        """Rebuild the session with ``threads`` intra-op threads (None: onnxruntime's default)."""
        if threads != self.threads:
            self.threads = threads
            self._session = self._new_session()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().cpu().numpy().astype(self._input_dtype, copy=False)
        (out,) = self._session.run([OUTPUT_NAME], {self._input_name: feed})
        return torch.from_numpy(out).to(x.device)

    def count_weights(self) -> tuple[int, int]:
        """(parameters, nonzeros) over the graph's weight initializers.

        Weights are the float or integer initializers with at least one axis; scales, zero points and
        integer shape constants are left out. Stored int8 weights are symmetric (zero point 0), so a
        stored 0 is a weight of exactly 0; a MatMulNBits weight counts its logical K×N elements.
        """
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(self.file)).graph
        packed = _packed_weights(graph)
        parameters = nonzeros = 0
        for init in graph.initializer:
            if init.name in packed:
                count, nonzero = packed[init.name](numpy_helper.to_array(init))
            elif init.data_type in _WEIGHT_TYPES and len(init.dims) >= 1 and not init.name.endswith(_QPARAM_SUFFIXES):
                array = numpy_helper.to_array(init)
                count, nonzero = array.size, int(np.count_nonzero(array))
            else:
                continue
            parameters += count
            nonzeros += nonzero
        return parameters, nonzeros


def _packed_weights(graph: Any) -> dict[str, Any]:
    """For MatMulNBits weights (n-bit values packed into bytes): name → counter of (logical size, nonzeros)."""
    counters = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, bits = attrs["K"], attrs["N"], attrs.get("bits", 4)
        # Symmetric blocks store value + 2^(bits-1) (no zero-point input), so that offset is a weight of 0.
        offset = 1 << (bits - 1)

        def count(blob: np.ndarray, k: int = k, n: int = n, bits: int = bits, offset: int = offset) -> tuple[int, int]:
            raw = blob.reshape(n, -1).astype(np.uint8)
            if bits == 4:
                raw = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(n, -1)
            return k * n, int(np.count_nonzero(raw[:, :k] != offset))

        counters[node.input[1]] = count
    return counters
