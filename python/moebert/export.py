"""``moebert export``: a MoEBERT student folder -> ``OUT/model.onnx`` + config + tokenizer for ONNX Runtime."""
from __future__ import annotations

import os

__all__ = ["run"]


def run(args) -> int:
    import moebert_kernels.onnx as mo

    from .common import is_moebert_checkpoint, load_config, load_student, load_tokenizer
    from .outputs import check_output, replaced_folder

    check_output(args.output, {"--model": args.model}, getattr(args, "overwrite", False))
    load_config(args.model)
    if not is_moebert_checkpoint(args.model):
        raise ValueError(f"{args.model} is not a MoEBERT student (its config.json has no 'moebert' settings): "
                         "export a folder written by `moebert convert` or `moebert distill`")
    model = load_student(args.model, device="cpu")
    int8 = getattr(args, "int8", False)
    # Written beside the target and moved in only after the parity check: a failed export leaves --output as it was.
    with replaced_folder(args.output) as tmp:
        file = mo.export(model.float(), tmp, load_tokenizer(args.model), check=not args.no_check, int8=int8)
    file = os.path.join(args.output, os.path.basename(file))
    print(f"wrote {file} ({'int8' if int8 else 'fp32'}; checked in onnxruntime: {not args.no_check})")
    return 0
