"""Run under torchrun by test_ddp.py: supervised training with GradCache on two CPU processes (gloo DDP); every rank
writes a checksum of its LoRA weights so the test can check that the ranks stayed in sync."""
import sys
from pathlib import Path

import torch.distributed as dist

from llm2vec_fast.training.common import training_arguments
from llm2vec_fast.training.contrastive import (
    ContrastiveArguments,
    ContrastiveModel,
    _SequentialTrainer,
    build_dataset,
    load_encoder,
)


def main(model_dir, files, out):
    args = ContrastiveArguments(mode="supervised", train_files=files, output_dir=out, model=model_dir, batch_size=4,
                                max_length=32, gradcache_chunk_size=3, mask_false_negatives=True, max_steps=2,
                                warmup_steps=0, learning_rate=1e-2)
    enc = load_encoder(args)
    dataset, collator, _ = build_dataset(args, world_size=2)
    targs = training_arguments(out, batch_size=4, grad_accum=2, learning_rate=1e-2, max_steps=2, save_steps=0,
                               disable_tqdm=True, drop_last=True)
    before = sum(p.detach().double().sum() for p in enc.model.parameters() if p.requires_grad)
    trainer = _SequentialTrainer(model=ContrastiveModel(enc), args=targs, train_dataset=dataset,
                                 data_collator=collator, processing_class=enc.tokenizer, scale=50.0,
                                 mask_false_negatives=True, gradcache_chunk_size=3)
    trainer.train()
    after = sum(p.detach().double().sum() for p in enc.model.parameters() if p.requires_grad)
    kind = type(trainer.model_wrapped).__name__
    Path(out, f"rank{dist.get_rank()}.txt").write_text(f"{kind} {float(before)!r} {float(after)!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:4], sys.argv[4])
    # both ranks done with every collective before either tears gloo down: a process that exits while the other's
    # gloo threads still hold the connection makes that one abort (SIGABRT, seen in CI)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
