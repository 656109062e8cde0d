"""ONNX export of (patched) BERT-family models, and running the file in ONNX Runtime.

``export(model, out_dir, tokenizer)`` writes ``out_dir/model.onnx`` with dynamic batch and sequence axes,
plus the config and tokenizer, through ``torch.onnx.export(dynamo=True)`` with the translations in
``translations.py`` (standard ONNX ops only: no custom domain, no custom-op library). Hash tables,
gates and expert weights are initializers. ``OrtModel(out_dir)`` runs the file in onnxruntime and is
called like the Hugging Face model it came from.

Needs the optional packages ``onnx``, ``onnxscript`` and ``onnxruntime`` (``pip install moebert-kernels[onnx]``).
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["export", "OrtModel", "MODEL_FILE", "input_names", "quantize_int8", "INT8_TOLERANCE"]

MODEL_FILE = "model.onnx"
_PACKAGES = "onnx, onnxscript and onnxruntime (pip install 'moebert-kernels[onnx]')"


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"ONNX export and inference need {_PACKAGES}; {module} is not installed") from None


def input_names(config) -> list[str]:
    """The graph's inputs: token type ids only where the family has more than one type."""
    from ..hf import family_of

    names = ["input_ids", "attention_mask"]
    if family_of(config.model_type).model_type != "distilbert" and getattr(config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return names


class _Outputs(nn.Module):
    """Calls the model and returns its outputs as a tuple, in a fixed order."""

    def __init__(self, model: nn.Module, outputs: Sequence[str]):
        super().__init__()
        self.model, self.outputs = model, tuple(outputs)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return tuple(out[k] for k in self.outputs)


def _example(config, names, device) -> tuple[torch.Tensor, ...]:
    B, S = 2, 8  # not 0 or 1, so torch.export keeps both axes symbolic
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[1, S // 2:] = 0
    by_name = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(B, S, dtype=torch.int64)}
    return tuple(by_name[n].to(device) for n in names)


def _rel_err(got, want) -> float:
    want = want.double()
    return float((torch.as_tensor(got).double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _fold_weights(model) -> None:
    """Fold each expert's weight slice and transpose into an initializer of its own. onnxscript's default
    folding limits (256k elements) leave BERT-size weights as Gather/Transpose nodes, which
    ``quantize_dynamic`` cannot quantize and every session would fold again at load time."""
    from onnxscript import optimizer

    limit = 1 << 40
    optimizer.fold_constants(model, input_size_limit=limit, output_size_limit=limit)
    optimizer.remove_unused_nodes(model)


def export(model: nn.Module, path: str, tokenizer=None, *, opset_version: int = 18, check: bool = True,
           int8: bool = False) -> str:
    """Export ``model`` (a patched MoEBERT student or a dense model of a supported family) to ``path``.

    Writes ``path/model.onnx`` (inputs ``input_ids``, ``attention_mask`` [, ``token_type_ids``], both
    axes dynamic; outputs named as the model's, e.g. ``logits``), ``config.json`` and, when given, the
    tokenizer. With ``check`` the file is run in onnxruntime on an example batch with padding and must
    match PyTorch to a relative error of 1e-4 (fp32), else a RuntimeError is raised and the folder is
    left without a model file. Returns the path of the ONNX file.

    ``int8``: quantize the file with onnxruntime's ``quantize_dynamic`` (``quantize_int8``): every MatMul
    with a weight initializer, the experts' and the shared FFN's included, gets int8 weights with a scale
    per output channel (7-bit range) and uint8 activations quantized at run time. The check then allows ``INT8_TOLERANCE``.
    """
    from ..hf import SUPPORTED_MODEL_TYPES, family_of

    for m in ("onnx", "onnxscript", "onnxruntime"):
        _require(m)
    from .translations import TRANSLATIONS

    config = getattr(model, "config", None)
    if family_of(getattr(config, "model_type", None)) is None:
        raise ValueError(f"export supports Hugging Face models of types {list(SUPPORTED_MODEL_TYPES)}, got "
                         f"{type(model).__name__} ({getattr(config, 'model_type', None)!r})")
    device = next(model.parameters()).device
    names = input_names(config)
    example = _example(config, names, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(**dict(zip(names, example)))
            outputs = [k for k, v in ref.items() if isinstance(v, torch.Tensor)]
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            program = torch.onnx.export(
                _Outputs(model, outputs), example, dynamo=True, input_names=names, output_names=outputs,
                dynamic_shapes={n: {0: batch, 1: seq} for n in names}, custom_translation_table=TRANSLATIONS,
                opset_version=opset_version, verbose=False)
    finally:
        model.train(was_training)
    _fold_weights(program.model)
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, MODEL_FILE)
    program.save(file)
    if int8:
        quantize_int8(file, file)
    if check:
        got = OrtModel(file)(**{n: t.cpu() for n, t in zip(names, example)})
        tol = 1e-4 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 2e-2
        tol = INT8_TOLERANCE if int8 else tol
        for k in outputs:
            err = _rel_err(getattr(got, k), ref[k].cpu())
            if not err <= tol:
                os.remove(file)
                raise RuntimeError(f"the exported {k} differs from PyTorch's in onnxruntime: relative error "
                                   f"{err:.2e} > {tol:.0e}; the file was removed")
    config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return file


# 7-bit int8 weights (per channel) and uint8 activations (per tensor) over a whole encoder: the fp32 model's outputs
# within 10% of their largest value. Measured on tiny random students of every family: 0.2-2.4%, the same as
# the PyTorch int8 student (tests/test_onnx_int8.py); a wrong scale or a saturating GEMM reads 10-15%.
INT8_TOLERANCE = 0.1


def quantize_int8(src: str, dst: str) -> str:
    """onnxruntime's dynamic int8 quantization of the ONNX file ``src`` into ``dst`` (may be ``src``): every
    MatMul whose weight is an initializer (attention, heads, each expert's and the shared FFN's GEMMs)
    becomes int8 weights (7-bit range) with per-output-channel scales and run-time uint8 activations. ``export`` folds
    each expert's weight into an initializer of its own so that none is left in float."""
    _require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst + ".int8.tmp"
    try:
        # reduce_range: 7-bit weights, as torch.ao. Without it the u8*s8 pair sums of CPUs without VNNI saturate
        # (ModernBERT's logits were 13% off on an AVX2 host, 1% with it).
        quantize_dynamic(src, tmp, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                         weight_type=QuantType.QInt8)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dst


class OrtModel:
    """An exported model in onnxruntime, called like the HF model: ``OrtModel(dir)(input_ids=...,
    attention_mask=...)`` returns an object with the outputs (``.logits``, ...) as torch tensors.

    Args:
        path: the export folder (or the ``.onnx`` file itself).
        threads: intra-op threads (default: onnxruntime's choice).
        providers: execution providers; stock CPU by default.
    """

    def __init__(self, path: str, threads: Optional[int] = None, providers: Sequence[str] = ("CPUExecutionProvider",)):
        ort = _require("onnxruntime")
        file = path if path.endswith(".onnx") else os.path.join(path, MODEL_FILE)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} does not exist: export the model first (moebert export)")
        folder = os.path.dirname(file)
        self.config = None
        if os.path.isfile(os.path.join(folder, "config.json")):
            from transformers import AutoConfig

            self.config = AutoConfig.from_pretrained(folder)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(file, options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def eval(self) -> "OrtModel":
        return self

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        ids = torch.as_tensor(input_ids)
        given = {"input_ids": ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        defaults = {"attention_mask": torch.ones_like, "token_type_ids": torch.zeros_like}
        feed = {}
        for name in self.input_names:
            t = given.get(name)
            t = defaults[name](ids) if t is None else torch.as_tensor(t)
            feed[name] = t.detach().cpu().to(torch.int64).numpy()
        out = self.session.run(self.output_names, feed)
        return SimpleNamespace(**{k: torch.from_numpy(v) for k, v in zip(self.output_names, out)})
