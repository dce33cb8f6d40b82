"""CPU inference backends for the embedder: the same sentence-transformers model (tokenizer,
prompts, pooling, normalisation all unchanged) with its transformer run by ONNX Runtime (fp32 or
int8), OpenVINO, or PyTorch's dynamic int8 quantisation. The embedding job and the CLI offer the
fp32 ones (onnx, openvino: recall@10 within 0.01 of torch); the int8 ones lost 0.14-0.23 recall@10
on the shared corpora (BENCHMARKS.md) and stay here for measurement.

sentence-transformers' own ``backend="onnx" / "openvino"`` needs ``optimum-onnx`` /
``optimum-intel``, which pin ``transformers<4.58`` / ``<5.6`` and cannot be installed beside this
project's ``transformers`` 5.x; so the export is done here the way they do it (the Hugging Face
model traced to ONNX, outputs ``last_hidden_state``) with ``torch.onnx`` and run with the plain
``onnxruntime`` / ``openvino`` packages (extra ``cpu-backends``), which install without touching torch
or transformers. The ONNX file is exported on first use, from the local weights only (never a
download), into a cache directory beside the model (``<model dir>/retromem-backends/``; when that is
not writable, ``$XDG_CACHE_HOME/retromem/backends/<weights sha256>``), written atomically and tied to
the weights' sha256, so a changed model is exported again.

:func:`install_backend` swaps the model's Hugging Face transformer for a module that runs the chosen
runtime; everything else in the sentence-transformers pipeline keeps running as it was. Threads:
the runtime uses ``torch.get_num_threads()`` at load time, so ``torch.set_num_threads(1)`` (or
``OMP_NUM_THREADS=1``) measures one core.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retromem.errors import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "torch-int8", "onnx", "onnx-int8", "openvino")
ONNX_OPSET = 17
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_backend(backend: str, device: str, fp16: bool) -> None:
    """ConfigError unless ``backend`` is known and can run on ``device`` in that precision."""
    from retromem.config import one_of

    one_of(backend, "backend", BACKENDS, flag="--backend")
    if backend != "torch" and (not device.startswith("cpu") or fp16):
        raise ConfigError(f"`backend` (--backend) {backend!r} runs on the CPU in fp32 only (device {device!r}, "
                          f"fp16 {fp16}): use --backend torch on a GPU")


def cache_dir(model_path: str, weights_sha256: str) -> Path:
    """Where the exported files of the model at ``model_path`` live: beside it, or in the user cache."""
    local = Path(model_path)
    if local.is_dir() and os.access(local, os.W_OK):
        return local / "retromem-backends"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "retromem" / "backends" / weights_sha256[:32]


def install_backend(st_model: Any, backend: str, model_path: str, weights_sha256: str) -> None:
    """Run ``st_model``'s transformer (module 0, a sentence-transformers ``Transformer``) on
    ``backend``; "torch" leaves it as it is."""
    if backend == "torch":
        return
    transformer = st_model[0]
    hf = getattr(transformer, "model", None)
    if hf is None or not hasattr(hf, "config"):
        raise ConfigError(f"`backend` (--backend) {backend!r} needs a Hugging Face transformer as the model's first "
                          f"module, not {type(transformer).__name__}: use --backend torch")
    if backend == "torch-int8":
        # dynamic int8: Linear weights quantised once per output channel (per tensor loses far more:
        # mean cosine to fp32 0.96 against 0.995 in ONNX Runtime), activations per batch
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        transformer.model = quantize_dynamic(hf, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        return
    onnx_path = export_onnx(hf, cache_dir(model_path, weights_sha256), weights_sha256,
                            int8=backend == "onnx-int8")
    transformer.model = RuntimeTransformer(hf.config, onnx_path, "openvino" if backend == "openvino" else "onnxruntime")


def export_onnx(hf_model: Any, out_dir: Path, weights_sha256: str, *, int8: bool = False) -> Path:
    """``model.onnx`` (fp32) or ``model-int8.onnx`` (onnxruntime dynamic int8 of it) in ``out_dir``,
    exported now unless a file of these weights is already there."""
    from retromem.datastore.atomic import atomic_path, write_json

    name = "model-int8.onnx" if int8 else "model.onnx"
    path, stamp = out_dir / name, out_dir / f"{name}.json"
    want = {"weights_sha256": weights_sha256, "opset": ONNX_OPSET, "int8": int8, "per_channel": int8}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    if int8:
        fp32 = export_onnx(hf_model, out_dir, weights_sha256)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        logger.info("embedder: quantising %s to int8", fp32)
        with atomic_path(path) as tmp:
            # per output channel: per tensor loses far more (mean cosine to fp32 0.96 against 0.995)
            quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
    else:
        _export_fp32(hf_model, path)
    write_json(stamp, want)
    return path


def _export_fp32(hf_model: Any, path: Path) -> None:
    from retromem.datastore.atomic import atomic_path

    class LastHidden(torch.nn.Module):
        """The transformer with one output, (batch, seq, hidden), as ONNX wants it."""

        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                          return_dict=True).last_hidden_state

    logger.info("embedder: exporting the transformer to ONNX at %s (once)", path)
    x = torch.ones(2, 8, dtype=torch.long)
    axes = {n: {0: "batch", 1: "seq"} for n in (*_INPUTS, "last_hidden_state")}
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(LastHidden(hf_model).eval(), (x, x, torch.zeros_like(x)), str(tmp), input_names=list(_INPUTS),
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)


class RuntimeTransformer(torch.nn.Module):
    """Stands in for the Hugging Face model inside sentence-transformers' ``Transformer`` module:
    called with the tokenizer's tensors, returns ``{"last_hidden_state": (batch, seq, hidden)}``
    computed by ONNX Runtime or OpenVINO on one ONNX file."""

    def __init__(self, config: Any, onnx_path: Path, runtime: str) -> None:
        super().__init__()
        self.config = config
        self.runtime = runtime
        threads = max(1, torch.get_num_threads())
        if runtime == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
            self._names = {i.name for i in self._session.get_inputs()}
        else:
            import openvino as ov

            core = ov.Core()
            # f32: the default hint may run bf16 on CPUs that have it, which is another model
            self._compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU",
                                                {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
            self._names = {p.get_any_name() for p in self._compiled.inputs}

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **_: Any) -> dict[str, Any]:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        feed = {k: np.ascontiguousarray(v.cpu().numpy(), dtype=np.int64)
                for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask), ("token_type_ids", token_type_ids))
                if k in self._names}
        if self.runtime == "onnxruntime":
            out = self._session.run(["last_hidden_state"], feed)[0]
        else:
            out = self._compiled(feed)[0]
        return {"last_hidden_state": torch.from_numpy(np.asarray(out, dtype=np.float32))}
