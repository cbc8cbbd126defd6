"""A small training run for the subprocess tests (resume after kill, several processes).

    python train_script.py CHECKPOINT_DIR RUN_DIR OUT_JSON [--steps N]
    torchrun --nproc_per_node 2 train_script.py ...

Trains a QAT-prepared tiny DeepSeek-V3 on fixed random token blocks and writes the
TrainResult (with every rank's weight digest) to OUT_JSON from the main process.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from dsq.finetune.data import TokenBlocks
from dsq.finetune.qat import QATConfig, prepare_qat
from dsq.finetune.trainer import TrainConfig, make_accelerator, train
from dsq.quantize import PerGroup, WeightScheme


class _Data:
    def __init__(self, train: TokenBlocks, validation: TokenBlocks) -> None:
        self.train, self.validation = train, validation


def blocks(n: int, length: int, seed: int) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (n, length), generator=g)
    return TokenBlocks(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("checkpoints")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    prepare_qat(model, QATConfig(WeightScheme(4, PerGroup(32)), learnable_scales=True))
    config = TrainConfig(max_steps=args.steps, batch_size=2, grad_accum=2, lr=args.lr, warmup_steps=2,
                         eval_every=8, save_every=2, keep_checkpoints=2)
    accelerator = make_accelerator()
    result = train(model, _Data(blocks(64, 32, 0), blocks(8, 32, 1)), config, checkpoint_dir=Path(args.checkpoints),
                   accelerator=accelerator, progress=False)
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(result.to_dict()))


if __name__ == "__main__":
    main()
