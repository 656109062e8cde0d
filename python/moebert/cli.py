"""The `moebert` command."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import moebert_kernels as mk

    torch.manual_seed(args.seed)
    cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=512, max_position_embeddings=128)
    dense = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 32))
    with torch.no_grad():
        ref = dense(ids).logits
        mk.patch(dense, num_experts=4, expert_size=192, shared=128, seed=args.seed)
        out = dense(ids).logits
    total = sum(p.numel() for p in dense.parameters())
    print(f"patched {len(mk.moe_layers(dense))} layers; params {total:,}; "
          f"max |logit change| {float((out - ref).abs().max()):.3e}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moebert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole MoEBERT chain on the embedded default")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
