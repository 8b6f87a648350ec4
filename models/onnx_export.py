"""torch modules to ONNX bytes, one way for every model this project runs on onnxruntime
(CRAFT in models/ocr.py, CLIP's towers in models/clip_onnx.py).

torch's TorchScript exporter (``dynamo=False``: the dynamo one needs onnxscript, which is not a
dependency) imports the ``onnx`` package only to splice custom onnxscript functions into the
model; ours have none. When ``onnx`` is not installed that step is skipped (the bytes are then
exactly what torch's C++ exporter wrote). Callers check the result numerically before using it.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Any

OPSET = 17


def export_onnx(
    module: Any, example: tuple, input_names: list[str], output_names: list[str], dynamic_axes: dict[str, dict[int, str]]
) -> bytes:
    """``module`` (eval mode) traced on ``example`` and written as ONNX bytes with ``dynamic_axes``."""
    import torch

    buf = io.BytesIO()
    kwargs: dict[str, Any] = dict(input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                                  opset_version=OPSET, dynamo=False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if importlib.util.find_spec("onnx") is not None:
            torch.onnx.export(module, example, buf, **kwargs)
        else:
            from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

            original = onnx_proto_utils._add_onnxscript_fn
            onnx_proto_utils._add_onnxscript_fn = lambda model_bytes, custom_opsets: model_bytes
            try:
                torch.onnx.export(module, example, buf, **kwargs)
            finally:
                onnx_proto_utils._add_onnxscript_fn = original
    return buf.getvalue()


__all__ = ["OPSET", "export_onnx"]
