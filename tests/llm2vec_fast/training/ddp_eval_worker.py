"""Run under torchrun by test_ddp.py: supervised training with evaluation on two CPU processes. Process 0 scores (a
scripted evaluator that notes which rank ran it) and sends the scores to process 1; both must take the same
early-stopping decision, or one would wait for the other forever."""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from llm2vec_fast.training.contrastive import ContrastiveArguments, train_contrastive


def main(model_dir, files, out):
    values = iter([0.9, 0.5, 0.4, 0.3])

    def score(encoder):
        Path(out, f"scored-by-rank{dist.get_rank()}").touch()
        return {"score": next(values)}

    r = train_contrastive(ContrastiveArguments(
        mode="supervised", train_files=files, output_dir=out, model=model_dir, batch_size=4, max_length=32,
        max_steps=8, warmup_steps=0, learning_rate=1e-2, save_steps=0, disable_tqdm=True, evaluators=[score],
        eval_steps=2, early_stopping_patience=2))
    keep = {k: r[k] for k in ("global_step", "evaluations", "best", "stopped_early_at")}
    Path(out, f"result{dist.get_rank()}.json").write_text(json.dumps(keep))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:4], sys.argv[4])
    # both ranks done with every collective before either tears gloo down: a process that exits while the other's
    # gloo threads still hold the connection makes that one abort (SIGABRT, seen in CI)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
