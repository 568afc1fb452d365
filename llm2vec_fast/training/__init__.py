"""Training: masked next-token prediction (MNTP), unsupervised SimCSE, supervised contrastive training and training on
scored pairs (CoSENT, AnglE, cosine MSE), on transformers' Trainer with LoRA (peft).

Modules: :mod:`.data` (text → blocks, masking collator, contrastive and scored-pair readers), :mod:`.losses` (MNTP,
contrastive and scored-pair losses with PyTorch twins), :mod:`.gradcache`, :mod:`.monitor` (evaluation during
training), :mod:`.mntp` and :mod:`.contrastive` (drivers), :mod:`.cli` (the ``llm2vec-fast train`` subcommands).
Importing this package does not import the drivers' heavy dependencies.
"""
import importlib

_LAZY = {
    "MNTPArguments": ".mntp",
    "train_mntp": ".mntp",
    "ContrastiveArguments": ".contrastive",
    "train_contrastive": ".contrastive",
    "add_subcommands": ".cli",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
