"""An MTEB 2.x encoder around :class:`llm2vec_fast.LLM2Vec`: ``mteb.evaluate(MTEBEncoder(l2v), tasks)`` just works.

It follows mteb's ``EncoderProtocol`` (``mteb.models.models_protocols``): ``encode(inputs: DataLoader[BatchedInput], *,
task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> array``, ``similarity``, ``similarity_pairwise``
and an ``mteb_model_meta`` property. mteb is imported lazily (only ``mteb_model_meta`` needs it), so this module loads
without mteb installed.

Instructions, LLM2Vec style: the chosen instruction becomes the first element of ``[instruction, text]`` items, so
its tokens are attended to but not pooled (``skip_instruction``). Which one:

1. the wrapper's ``prompts`` (default: the model's stored ``l2v.prompts``), looked up like mteb and
   sentence-transformers do: ``"{task name}-{prompt type}"``, ``"{task name}"``, ``"{task type}-{prompt type}"``,
   ``"{task type}"``, ``"{prompt type}"`` (prompt types are ``query`` and ``document``);
2. otherwise, for documents: none (LLM2Vec encodes documents without an instruction);
3. otherwise the task's own ``metadata.prompt`` (a string, or a dict keyed by prompt type), else mteb's default
   instruction for the task's kind (e.g. STS: "Retrieve semantically similar text."), when ``use_task_prompts``
   (default True);
4. otherwise no instruction.

The instruction is then written as LLM2Vec's MTEB evaluations write it (mteb's own ``LLM2VecModel``, the original's
evaluation script): a trailing period becomes a colon, and a colon is added where none ends it ("Retrieve
semantically similar text." → "Retrieve semantically similar text:"), so scores compare with published LLM2Vec
figures; ``llm2vec_instruction_format=False`` passes instructions verbatim.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from .quantization import quantize_embeddings
from .similarity import similarity, similarity_pairwise


def _abstask_prompt(task_name: str) -> str | None:
    """mteb's per-task-kind default instruction (e.g. STS: "Retrieve semantically similar text."), if mteb knows
    the task; None otherwise (custom tasks, mteb missing, or an mteb without this helper)."""
    if "mteb" not in sys.modules:  # only consult mteb when it is driving the run: importing it takes seconds
        return None
    try:
        from mteb.abstasks.abstask import get_abstask_prompt

        return get_abstask_prompt(task_name)
    except Exception:  # optional: a missing helper or an unknown task only means no default instruction
        return None


def llm2vec_instruction(instruction: str) -> str:
    """An instruction as LLM2Vec's MTEB runs write it: periods stripped from the ends, one colon at the end."""
    if instruction and not instruction.endswith(":"):
        instruction = instruction.strip(".") + ":"
    return instruction


def _value(x):
    """Enum members (mteb's PromptType) and plain strings alike."""
    return getattr(x, "value", x)


class MTEBEncoder:
    """Wrap an ``LLM2Vec`` (or anything with its ``encode`` signature) for ``mteb`` 2.x.

    Args:
        l2v: the encoder.
        prompts: instruction lookup table (see the module docstring); default ``l2v.prompts``.
        model_name: ``"org/name"`` recorded in the model metadata and result folders (default: derived from the
            model's ``_name_or_path``).
        revision: recorded revision (default ``"local"``).
        batch_size: default batch size when mteb passes none.
        max_batch_tokens: token budget per packed batch, passed to ``encode``.
        use_task_prompts: fall back to the task's ``metadata.prompt`` for queries and symmetric tasks.
        llm2vec_instruction_format: end every instruction with a colon as LLM2Vec's MTEB runs do (see the module
            docstring); False passes them verbatim.
    """

    def __init__(self, l2v, prompts: dict | None = None, *, model_name: str | None = None, revision: str = "local",
                 batch_size: int = 32, max_batch_tokens: int | None = None, use_task_prompts: bool = True,
                 llm2vec_instruction_format: bool = True):
        self.model = l2v
        self.model_prompts = dict(prompts if prompts is not None else (getattr(l2v, "prompts", None) or {}))
        for k, v in self.model_prompts.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"prompts must map str to str, got {k!r}: {v!r}")
        self.model_name = model_name or self._default_name()
        if "/" not in self.model_name:
            raise ValueError(f"model_name must look like 'organization/model', got {self.model_name!r}")
        self.revision = revision
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.use_task_prompts = use_task_prompts
        self.llm2vec_instruction_format = llm2vec_instruction_format
        self._meta = None

    def _default_name(self) -> str:
        cfg = getattr(getattr(self.model, "model", None), "config", None) or getattr(self.model, "config", None)
        base = str(getattr(cfg, "_name_or_path", "") or "model").rstrip("/").split("/")[-1] or "model"
        return f"llm2vec_fast/{base}"

    # ------------------------------------------------------------------ prompts
    def get_instruction(self, task_metadata, prompt_type=None) -> str | None:
        """The instruction for this task and prompt type (None: encode plain texts); see the module docstring."""
        name = getattr(task_metadata, "name", None)
        ttype = getattr(task_metadata, "type", None)
        ptype = _value(prompt_type) if prompt_type is not None else None
        keys = []
        if name and ptype:
            keys.append(f"{name}-{ptype}")
        if name:
            keys.append(name)
        if ttype and ptype:
            keys.append(f"{ttype}-{ptype}")
        if ttype:
            keys.append(ttype)
        if ptype:
            keys.append(ptype)
        for key in keys:
            if key in self.model_prompts:
                return self.model_prompts[key] or None
        if ptype == "document" or not self.use_task_prompts:
            return None
        prompt = getattr(task_metadata, "prompt", None)
        if isinstance(prompt, dict):
            prompt = prompt.get(ptype) if ptype else None
        if not prompt and name:
            prompt = _abstask_prompt(name)
        return prompt or None

    # ------------------------------------------------------------------ protocol
    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        """Encode the ``text`` field of every batch of ``inputs`` (an mteb DataLoader of dicts) → ``[N, D]`` numpy.

        Recognised keyword arguments: ``batch_size``, ``show_progress_bar``, ``precision`` (float32 / int8 / uint8 /
        binary / ubinary, see :func:`llm2vec_fast.quantization.quantize_embeddings`); others are ignored, as the
        protocol reserves them.
        """
        texts = []
        for batch in inputs:
            if not isinstance(batch, dict) or "text" not in batch:
                got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
                raise ValueError(f"each batch must be a dict with a 'text' list (mteb BatchedInput), got {got}")
            texts.extend(batch["text"])
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"input {i} must be a string, got {type(t).__name__}")
        instruction = self.get_instruction(task_metadata, prompt_type)
        if instruction and self.llm2vec_instruction_format:
            instruction = llm2vec_instruction(instruction)
        items = [[instruction, t] for t in texts] if instruction else texts
        enc_kwargs = dict(batch_size=kwargs.get("batch_size") or self.batch_size,
                          show_progress_bar=bool(kwargs.get("show_progress_bar", False)), convert_to_numpy=True)
        if self.max_batch_tokens is not None:
            enc_kwargs["max_batch_tokens"] = self.max_batch_tokens
        if not items:
            width = self.model.model.config.hidden_size if hasattr(self.model, "model") else 0
            return np.zeros((0, width), dtype=np.float32)
        emb = self.model.encode(items, **enc_kwargs)
        emb = np.asarray(emb.cpu() if isinstance(emb, torch.Tensor) else emb, dtype=np.float32)
        precision = kwargs.get("precision")
        if precision and precision != "float32":
            return quantize_embeddings(emb, precision)
        return emb

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity matrix ``[N1, N2]`` (a torch tensor, as mteb and sentence-transformers return)."""
        return similarity(embeddings1, embeddings2, "cosine")

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """Row-wise cosine similarity ``[N]``."""
        return similarity_pairwise(embeddings1, embeddings2, "cosine")

    @property
    def mteb_model_meta(self):
        """An ``mteb.models.ModelMeta`` describing the wrapped model (needs ``mteb`` installed)."""
        if self._meta is None:
            try:
                from mteb.models import ModelMeta
            except ImportError as e:
                raise ImportError("mteb_model_meta needs mteb: pip install mteb") from e
            inner = getattr(self.model, "model", None)
            cfg = getattr(inner, "config", None)
            n_params = sum(p.numel() for p in inner.parameters()) if isinstance(inner, torch.nn.Module) else None
            self._meta = ModelMeta(
                loader=None, name=self.model_name, revision=self.revision, release_date=None, languages=None,
                n_parameters=n_params,
                memory_usage_mb=None if n_params is None else round(n_params * 4 / 2**20, 1),
                max_tokens=getattr(self.model, "max_length", None),
                embed_dim=getattr(cfg, "hidden_size", None), license=None, open_weights=True,
                public_training_code=None, public_training_data=None, framework=["LLM2Vec", "PyTorch"],
                similarity_fn_name="cosine", use_instructions=True, training_datasets=None,
            )
        return self._meta
