"""The sentence-transformers module behind folders from :func:`llm2vec_fast.st_export.save_sentence_transformers`.

One module does everything (tokenize, bidirectional forward, pooling) by delegating to :class:`llm2vec_fast.LLM2Vec`,
so a ``SentenceTransformer`` built on it embeds exactly as ``LLM2Vec.encode`` does, including the original llm2vec's
instruction handling: a sentence-transformers prompt (``encode(..., prompt=...)`` / ``prompt_name=...`` /
``encode_query``) arrives here as a separate string and becomes the instruction of an ``[instruction, text]`` item,
attended to but not pooled. Plain ``Transformer`` + ``Pooling(include_prompt=False)`` modules cannot reproduce this:
they load the model causal, and they count prompt tokens on the prompt tokenized alone, which differs at the
prompt/text boundary from what llm2vec pools.

Importing this module needs sentence-transformers ≥ 5 (the ``InputModule`` base class with ``preprocess``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from sentence_transformers.base.modules.input_module import InputModule

from .encoder import LLM2Vec

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}  # auto: the checkpoint's own dtype


class LLM2VecSTModule(InputModule):
    """sentence-transformers module wrapping an :class:`~llm2vec_fast.LLM2Vec` (saved in the model folder's root)."""

    save_in_root = True
    config_keys: list[str] = []
    # the folder's root config.json belongs to the Hugging Face model; this module keeps its settings in
    # llm2vec_config.json (written by LLM2Vec.save), so it reads no module config of its own
    config_file_name = "llm2vec_config.json"

    def __init__(self, l2v: LLM2Vec):
        super().__init__()
        if not isinstance(l2v, torch.nn.Module) or not hasattr(l2v, "tokenize"):
            raise TypeError(f"LLM2VecSTModule wraps an LLM2Vec, got {type(l2v).__name__}")
        self.l2v = l2v
        self.tokenizer = l2v.tokenizer

    # ------------------------------------------------------------------ sentence-transformers hooks
    @property
    def max_seq_length(self) -> int:
        return self.l2v.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.l2v.max_length = int(value)

    def get_embedding_dimension(self) -> int:
        return int(self.l2v.model.config.hidden_size)

    get_sentence_embedding_dimension = get_embedding_dimension

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict:
        """Packed LLM2Vec features for a batch of texts; ``prompt`` becomes each text's instruction.

        Texts that ``LLM2Vec.encode`` embeds as zero vectors (empty or whitespace-only, or with no text token left
        to pool) are left out of the packed batch and filled with zeros in :meth:`forward`.
        """
        texts = []
        for i, x in enumerate(inputs):
            if isinstance(x, tuple) and len(x) == 1:
                x = x[0]
            if not isinstance(x, str):
                raise TypeError(f"input {i} must be a string, got {type(x).__name__}")
            texts.append(x)
        live = [i for i, t in enumerate(texts) if t.strip()]

        def items(rows):
            return [[prompt, texts[i]] if prompt else texts[i] for i in rows]

        feats = self.l2v.tokenize(items(live), prepared_ok=False) if live else None
        if feats is not None and self.l2v.skip_instruction:
            cu = feats["cu_seqlens"].long()
            pooled = (cu[1:] - cu[:-1]) - feats["pool_start"].long()
            if (pooled <= 0).any():  # the instruction filled the whole window: nothing of the text to pool
                live = [r for r, n in zip(live, pooled.tolist(), strict=True) if n > 0]
                feats = self.l2v.tokenize(items(live), prepared_ok=False) if live else None
        out = dict(feats or {})
        out["llm2vec_rows"] = torch.tensor(live, dtype=torch.long)
        out["llm2vec_batch"] = len(texts)
        return out

    def forward(self, features: dict, **kwargs) -> dict:
        """Add ``sentence_embedding`` ``[B, H]`` (zero rows for the texts left out in preprocess), and
        ``token_embeddings`` ``[B, L, H]`` with ``attention_mask`` ``[B, L]``: each text's pooled tokens' last hidden
        states (what ``LLM2Vec.encode(..., output_value="token_embeddings")`` gives), padded at the end, for
        sentence-transformers' ``output_value="token_embeddings"``."""
        from .encoder import pool

        n = int(features["llm2vec_batch"])
        rows = features["llm2vec_rows"]
        width = self.get_embedding_dimension()
        dtype, device = next(self.l2v.model.parameters()).dtype, self.l2v.device
        emb = torch.zeros(n, width, dtype=dtype, device=device)
        spans = []
        if len(rows):
            m = len(rows)
            f, hidden = self.l2v._run(features)
            emb[rows.to(device)] = pool(hidden, f["cu_seqlens"], self.l2v.pooling_mode, f["pool_start"])[:m].to(dtype)
            # the host copies: no device-to-host copy for the spans
            cu = [int(x) for x in features["cu_seqlens_host"][:m + 1]]
            starts = [int(x) for x in features["pool_start_host"][:m]]
            spans = [hidden[a + p:b] for a, b, p in zip(cu[:-1], cu[1:], starts, strict=True)]
        longest = max((len(t) for t in spans), default=0) or 1
        tokens = torch.zeros(n, longest, width, dtype=dtype, device=device)
        mask = torch.zeros(n, longest, dtype=torch.long, device=device)
        for r, t in zip(rows.tolist(), spans, strict=True):
            tokens[r, :len(t)] = t.to(dtype)
            mask[r, :len(t)] = 1
        features["sentence_embedding"] = emb
        features["token_embeddings"] = tokens
        features["attention_mask"] = mask
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """Write the LLM2Vec model, tokenizer and its settings into ``output_path``. The prompts sentence-transformers
        holds (it writes them to ``config_sentence_transformers.json`` before saving its modules) are the ones
        saved, so that ``LLM2Vec.from_pretrained`` of the folder sees the same named prompts, edits included."""
        st_config = Path(output_path) / "config_sentence_transformers.json"
        if st_config.is_file():
            try:
                prompts = json.loads(st_config.read_text()).get("prompts")
            except (OSError, json.JSONDecodeError):
                prompts = None
            if isinstance(prompts, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in prompts.items()):
                self.l2v.prompts = dict(prompts)
        self.l2v.save(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, model_kwargs: dict | None = None, **kwargs) -> LLM2VecSTModule:
        """Load the LLM2Vec folder (``LLM2Vec.from_pretrained``); ``model_kwargs`` may carry ``dtype`` /
        ``torch_dtype`` and ``attn_backend``."""
        path = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        mk = dict(model_kwargs or {})
        dtype = mk.pop("dtype", None) or mk.pop("torch_dtype", None)
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        # float32 unless model_kwargs ask otherwise (sentence-transformers' own default); loaded on the CPU because
        # SentenceTransformer moves the whole model to its device right after loading
        l2v = LLM2Vec.from_pretrained(path, dtype=dtype, device="cpu",
                                      attn_backend=mk.pop("attn_backend", "auto"))
        return cls(l2v)
