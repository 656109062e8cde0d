"""`moebert distill` under `torchrun --nproc_per_node 2` (gloo, CPU): the experts stay identical across ranks.

Run as a script, this file is the worker that torchrun starts.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch


def _worker(workdir: str) -> None:
    from moebert.cli import build_parser
    from moebert.distill import build_trainer

    import moebert_kernels as mk

    args = build_parser().parse_args([
        "distill", "--teacher", f"{workdir}/base", "--student", f"{workdir}/student0", "--output",
        f"{workdir}/out", "--task", "classification", "--data", f"{workdir}/train.csv", "--text-column", "text",
        "--label-column", "sentiment", "--device", "cpu", "--batch-size", "4", "--max-steps", "3",
        "--learning-rate", "1e-2", "--save-steps", "1000", "--logging-steps", "1"])
    trainer, _, _ = build_trainer(args)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    rank = int(os.environ["RANK"])
    state = {f"{i}.{name}": p.detach().clone() for i, layer in enumerate(mk.moe_layers(model))
             for name, p in layer.named_parameters(recurse=False)}
    state["world_size"] = torch.tensor(trainer.args.world_size)
    state["samples"] = torch.tensor(len(trainer.get_train_dataloader()))
    torch.save(state, f"{workdir}/rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_keeps_experts_identical(tmp_path):
    from moebert.cli import main
    from test_app_chain import make_base, write_rows

    make_base(str(tmp_path / "base"))
    write_rows(str(tmp_path / "train.csv"), 32)
    assert main(["convert", "--model", str(tmp_path / "base"), "--task", "classification", "--output",
                 str(tmp_path / "student0"), "--no-importance", "--num-experts", "2", "--expert-size", "24",
                 "--shared", "8"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.dirname(__file__)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert int(r0["world_size"]) == 2 and int(r1["world_size"]) == 2
    import moebert_kernels as mk

    init = {f"{i}.{n}": p for i, layer in enumerate(mk.moe_layers(mk.from_pretrained(str(tmp_path / "student0"))))
            for n, p in layer.named_parameters(recurse=False)}
    moved = 0
    for key, p0 in init.items():
        assert torch.equal(r0[key], r1[key]), f"{key} differs across ranks"
        moved += int(not torch.equal(r0[key], p0.detach()))
    assert moved > 0, "training did not change the experts: the test would pass without DDP's all-reduce"


if __name__ == "__main__":
    _worker(sys.argv[1])
