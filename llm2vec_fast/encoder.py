"""LLM2Vec: encode texts with a (bidirectional) decoder LLM; a drop-in for the original ``llm2vec`` 0.2.3.

Texts are tokenized in chunks that grow from 64 to 32,768 texts (one batched call with character offsets finds the
instruction span), sorted by length within the chunk, cut into token-budget batches and run **packed**: sequences
back to back, no padding token anywhere from the tokenizer to the pooled vector. A background thread tokenizes, packs
(and, on CUDA, pins and copies) the next batches while the current one runs, so the device starts after the first
few dozen texts and host work hides behind it.
"""
import contextlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._io import check_count
from .bidirectional import FAMILIES, is_bidirectional, to_bidirectional, to_packed_causal
from .cpu_memory import cpu_work
from .fused import fuse_ops
from .models import resolve_model

logger = logging.getLogger(__name__)

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
_OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")
# our pooling op's names for the original's modes
_POOL_OP_MODE = {"mean": "mean", "weighted_mean": "weighted_mean", "eos_token": "last_token",
                 "last_token": "last_token", "bos_token": "first_token"}
# the original joins instruction and text with this marker, then removes it before tokenizing
SEPARATOR = "!@#$%^&*()"
CONFIG_NAME = "llm2vec_config.json"
# settings the original's llm2vec_config.json has no key for (its loader passes every key of that file to its
# constructor, which takes only _ENCODER_KEYS): kept beside it, so that the original still loads our folders
EXTRA_CONFIG_NAME = "llm2vec_fast_config.json"
_ENCODER_KEYS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")
_DEFAULTS = {"pooling_mode": "mean", "max_length": 512, "doc_max_length": 400, "skip_instruction": True}
# the original appends these to every text in eos_token mode, keyed by config class (its quirk: Llama-family
# tokenizers without a "</s>" token get the three pieces " </", "s", ">")
_EOS_SUFFIX = {"llama": " </s>", "mistral": " </s>", "gemma": "<eos>", "qwen2": "<|endoftext|>"}
# chat wrappers the original applies for these exact model names
_TEMPLATES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "mistralai/Mistral-7B-Instruct-v0.2": ("[INST] ", " [/INST]"),
    "meta-llama/Llama-2-7b-chat-hf": ("[INST] ", " [/INST]"),
    "google/gemma-2-9b-it": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
    "Qwen/Qwen2-1.5B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
    "Qwen/Qwen2-7B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
}
_LLAMA3_BASE = "meta-llama/Meta-Llama-3-8B"  # the original appends its <|end_of_text|> for eos_token pooling
_LLAMA3_INSTRUCT = "meta-llama/Meta-Llama-3-8B-Instruct"


class LLM2Vec(nn.Module):
    """A decoder LLM as a text encoder.

    Args:
        model: a loaded HF base model (``LlamaModel``, …) or ``*ForCausalLM`` (its decoder is used), possibly a
            ``PeftModel``. Convert it with :func:`llm2vec_fast.to_bidirectional` first for LLM2Vec behaviour.
        tokenizer: its tokenizer (a fast tokenizer: character offsets locate the instruction span).
        pooling_mode: ``mean`` | ``weighted_mean`` (weights 1..L over the pooled span) | ``last_token`` (the
            text's last token) | ``eos_token`` (the original's: an end-of-sequence string is appended to every
            text, then its last token pooled; the string is the original's per model family, `` </s>`` for Llama
            and Mistral configs whatever their tokenizer, so it differs from ``last_token``) | ``bos_token`` (first
            token).
        max_length: tokens per text after joining the instruction; longer inputs are cut at the end.
        doc_max_length: texts longer than this many tokens are first shortened word-wise, as the original does.
        skip_instruction: instruction tokens are attended to but not pooled.
        prompts: named instructions stored with the model, e.g. ``{"query": "Given a question, ..."}``.
        instruction_span: ``"compat"`` (default) pools the last n tokens, n = the text's token count when tokenized
            alone, exactly as the original; ``"offsets"`` pools exactly the tokens that overlap the text.
    """

    def __setstate__(self, state):
        # an unpickled encoder (sentence-transformers' multi-process pool, torch.load of the object) wakes in a
        # process whose transformers has not registered llm2vec_fast's attention yet, which its config names
        super().__setstate__(state)
        from .bidirectional import register

        register()

    def __init__(self, model, tokenizer, pooling_mode="mean", max_length=512, doc_max_length=400,
                 skip_instruction=True, prompts=None, instruction_span="compat"):
        super().__init__()
        if instruction_span not in ("compat", "offsets"):
            raise ValueError(f"instruction_span must be 'compat' or 'offsets', got {instruction_span!r}")
        if pooling_mode not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {pooling_mode!r}; expected one of {POOLING_MODES}")
        check_count("max_length", max_length)
        check_count("doc_max_length", doc_max_length)
        if getattr(tokenizer, "is_fast", True) is False:
            raise TypeError("LLM2Vec needs a fast (Rust) tokenizer for character offsets; got a slow one: load it "
                            "with AutoTokenizer.from_pretrained(..., use_fast=True)")
        # a *ForCausalLM wrapper: use its decoder, the LM head is not needed to embed
        if hasattr(model, "lm_head") and hasattr(model, "model") and not hasattr(model, "peft_config"):
            model = model.model
        self.model = model
        self.tokenizer = tokenizer
        self.pooling_mode = pooling_mode
        self.max_length = max_length
        self.doc_max_length = doc_max_length
        self.skip_instruction = skip_instruction
        self.prompts = dict(prompts or {})
        self.instruction_span = instruction_span
        # the hub name that picks the original's chat template / eos suffix (``_TEMPLATES``); None: the model's
        # ``_name_or_path``. Saved in llm2vec_config.json, since a reloaded folder's name is its path.
        self.template_name = None
        self.config = model.config
        self._source = None  # from_pretrained's arguments, when it built this
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, base_model_name_or_path=None, peft_model_name_or_path=None, merge_peft=False,
                        enable_bidirectional=None, pooling_mode=None, max_length=None, doc_max_length=None,
                        skip_instruction=None, attn_backend="auto", device=None, dtype=None, fused_ops=None,
                        **hf_kwargs):
        """Load a model as the original ``LLM2Vec.from_pretrained`` does, plus device/dtype/backend choices.

        ``base_model_name_or_path``: a local HF folder, a hub id, or None / ``"smollm2-135m"`` for the embedded
        default model. A base folder that itself carries a LoRA adapter (the original MNTP releases) gets it merged.
        ``peft_model_name_or_path``: an adapter to apply on top (merged when ``merge_peft``). Encoder settings come
        from ``llm2vec_config.json`` (adapter folder first, else base folder) unless given here; their defaults are
        pooling ``mean``, max_length 512, doc_max_length 400, skip_instruction True. ``enable_bidirectional``
        defaults to the saved config's choice, else True; a causal model runs through the packed causal attention
        (:func:`llm2vec_fast.to_packed_causal`) unless ``attn_implementation`` is given. ``device`` defaults to CUDA
        when available; ``dtype`` to bfloat16 on CUDA and float32 on CPU. ``fused_ops`` (default: on unless
        ``attn_backend="torch"``, the all-PyTorch reference path) routes RMSNorm, the gated MLP activation and the
        rotary embedding through the fused Triton ops on CUDA (:func:`llm2vec_fast.fuse_ops`), and an unmerged
        adapter's layers through :func:`llm2vec_fast.lora.fuse_lora`. Other keyword arguments go to
        ``AutoModel.from_pretrained``.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = resolve_model(base_model_name_or_path)
        if peft_model_name_or_path is None and _is_adapter_only(path):
            # an adapter folder alone (e.g. a SimCSE output): its base comes from what training recorded
            peft_model_name_or_path, path = path, resolve_model(_adapter_base(path))
        if "torch_dtype" in hf_kwargs:  # the original's spelling
            dtype = dtype if dtype is not None else hf_kwargs.pop("torch_dtype")
            hf_kwargs.pop("torch_dtype", None)
        device = _check_device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        dtype = _parse_dtype(dtype) if dtype is not None else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        # how to load this again (encode worker processes with load="reload"); plain values only
        source = dict(base_model_name_or_path=path, peft_model_name_or_path=peft_model_name_or_path,
                      merge_peft=merge_peft, enable_bidirectional=enable_bidirectional, attn_backend=attn_backend,
                      dtype="auto" if dtype is None else str(dtype).replace("torch.", ""), fused_ops=fused_ops,
                      **{k: v for k, v in hf_kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))})

        config_addr = peft_model_name_or_path if peft_model_name_or_path is not None else path
        saved = _read_config(config_addr) or (_read_config(path) if peft_model_name_or_path else {})
        args = dict(_DEFAULTS)
        args.update({k: saved[k] for k in _ENCODER_KEYS if k in saved})
        given = {"pooling_mode": pooling_mode, "max_length": max_length, "doc_max_length": doc_max_length,
                 "skip_instruction": skip_instruction}
        args.update({k: v for k, v in given.items() if v is not None})
        if args["pooling_mode"] not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {args['pooling_mode']!r}; expected one of {POOLING_MODES}")
        if enable_bidirectional is None:
            enable_bidirectional = saved.get("bidirectional", True)

        config = AutoConfig.from_pretrained(path)
        if enable_bidirectional and getattr(config, "model_type", None) not in FAMILIES:
            raise ValueError(f"model type {config.model_type!r} is not supported with bidirectional attention; "
                             f"supported: {', '.join(FAMILIES)} (or pass enable_bidirectional=False)")
        tokenizer = AutoTokenizer.from_pretrained(path)
        # as the original sets them (our batches are packed, never padded; code that pads with l2v.tokenizer itself,
        # as the original's pooling expects, gets its left padding)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        own_attention = "attn_implementation" in hf_kwargs  # a causal model keeps an implementation asked for
        hf_kwargs.setdefault("attn_implementation", "sdpa")
        # an MNTP release as the hub serves it (config, adapter and tokenizer, no weights of its own): the weights of
        # the base its adapter names, the adapter merged below (what transformers 4.x's adapter redirect gave the
        # original)
        weights = resolve_model(_adapter_base(path)) if _is_release_without_weights(path) else path
        with _lm_head_expected(config):
            model = AutoModel.from_pretrained(weights, dtype=dtype, **hf_kwargs)
        if getattr(model, "_hf_peft_config_loaded", False) or os.path.exists(os.path.join(path,
                                                                                         "adapter_config.json")):
            model = _merge_embedded_adapter(model, path)
        if enable_bidirectional:
            to_bidirectional(model, backend=attn_backend)
        elif getattr(config, "model_type", None) in FAMILIES and not own_attention:
            # causal, but per sequence on the packed batch (HF's SDPA would mask a [T, T] square over the whole pack)
            to_packed_causal(model, backend=attn_backend)
        if fused_ops if fused_ops is not None else attn_backend != "torch":
            fuse_ops(model)  # "auto": the kernels on CUDA tensors, HF's forwards elsewhere
        premerge = _recorded_premerge(peft_model_name_or_path, path) if peft_model_name_or_path else None
        if premerge is not None:
            logger.info("merging %s into %s first: %s was trained on that merge", premerge, path,
                        peft_model_name_or_path)
            model = _load_peft(model, premerge).merge_and_unload()
        if peft_model_name_or_path is not None:
            if not os.path.exists(peft_model_name_or_path) and peft_model_name_or_path.count("/") != 1:
                raise FileNotFoundError(f"adapter {peft_model_name_or_path!r} not found: expected a folder with "
                                        "adapter_config.json or a hub id")
            model = _load_peft(model, peft_model_name_or_path)
            if merge_peft:
                model = model.merge_and_unload()
            elif fused_ops if fused_ops is not None else attn_backend != "torch":
                from .lora import fuse_lora

                fuse_lora(model)  # unmerged: the low-rank product accumulated into the base output in place
        model.to(device)
        model.eval()
        encoder = cls(model, tokenizer, prompts=saved.get("prompts"), **args)
        encoder.template_name = saved.get("template_name")
        encoder._source = source
        return encoder

    def save(self, output_path, merge_before_save=False, save_config=True):
        """Write model, tokenizer and ``llm2vec_config.json``; ``from_pretrained(output_path)`` reloads it.

        Files are written into a temporary folder beside them and renamed into place, so a file of ``output_path``
        that is a hard link (an MNTP release folder links its base model's config and weights) is replaced, never
        written through: saving into such a folder leaves the base model as it was."""
        model = self.model
        if merge_before_save and hasattr(model, "merge_and_unload"):
            model = self.model = model.merge_and_unload()
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".saving-", dir=out) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if save_config:
                cfg = {k: getattr(self, k) for k in _ENCODER_KEYS}
                cfg["bidirectional"] = is_bidirectional(_base(model))
                if self.prompts:
                    cfg["prompts"] = self.prompts
                name = self._template_name()
                if name in _TEMPLATES or name == _LLAMA3_BASE:
                    cfg["template_name"] = name
                write_encoder_config(tmp, cfg)
            _move_into(Path(tmp), out)

    @property
    def device(self):
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ tokenization
    def prepare_for_tokenization(self, text: str) -> str:
        """The original's per-model wrapping (chat templates for a few named models, the eos suffix)."""
        return self._preparer(idempotent=True)(text)

    def _template_name(self) -> str:
        return getattr(self, "template_name", None) or getattr(self.model.config, "_name_or_path", "") or ""

    def _preparer(self, idempotent=False):
        """:meth:`prepare_for_tokenization` as a function of the text alone: the model-dependent choices (template,
        eos suffix) made once per call instead of once per text; ``_unchanged`` when it returns every text unchanged.
        ``idempotent``: a text that already carries the wrapping is left as it is (the original's low-level path,
        where its collators prepare before they tokenize); otherwise every text is wrapped, as the original's
        ``encode`` does, even one that happens to end with the eos string already."""
        if type(self).prepare_for_tokenization is not LLM2Vec.prepare_for_tokenization:
            return self.prepare_for_tokenization  # a subclass's own wrapping
        name = self._template_name()
        template = _TEMPLATES.get(name)
        suffix = None
        # the original returns right after Llama-3-Instruct's wrapping: its <|eot_id|> ends the text, no eos string
        if self.pooling_mode == "eos_token" and name != _LLAMA3_INSTRUCT:
            suffix = ("<|end_of_text|>" if name == _LLAMA3_BASE
                      else _EOS_SUFFIX.get(getattr(self.model.config, "model_type", None)))
        if template is None and suffix is None:
            return _unchanged

        def prepare(text):
            # idempotent: a text prepared already (the original's collators prepare before they tokenize) is not
            # wrapped or suffixed twice
            if template is not None and not (idempotent and text.lstrip().startswith(template[0].strip())
                                             and text.rstrip().endswith(template[1].strip())):
                text = template[0] + text.strip() + template[1]
            if suffix is not None and not (idempotent and text.rstrip().endswith(suffix.strip())):
                text = text.strip() + suffix
            return text

        return prepare

    def _shorten(self, text: str) -> str:
        """The original's ``doc_max_length`` rule: drop words in proportion until the text fits.

        Where that rule would leave nothing of a non-empty text (one long "word": text without spaces, such as
        Chinese or Japanese, a URL, a long token string), the original pools an empty span; here the text is cut
        after its first ``doc_max_length`` tokens instead, at a character boundary of the text itself."""
        def count(t):
            return len(self.tokenizer(t, add_special_tokens=False, truncation=True,
                                      max_length=self.max_length)["input_ids"])
        original = text
        n = count(text)
        while n > self.doc_max_length:
            words = text.split()
            text = " ".join(words[: int(len(words) * self.doc_max_length / n)])
            n = count(text)
        if not text.strip() and original.strip():
            # a token's characters can straddle the cut (byte-level BPE): keep fewer until the prefix fits
            for k in range(self.doc_max_length, 0, -1):
                text = self._cut_tokens(original, k)
                if count(text) <= self.doc_max_length:
                    break
        return text

    def _cut_tokens(self, text: str, n: int) -> str:
        """The prefix of ``text`` that holds its first ``n`` tokens (character offsets of a fast tokenizer, else a
        decode of those tokens)."""
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=n,
                                 return_offsets_mapping=True)
            ends = [e for _, e in enc["offset_mapping"]]
            return text[:max(ends)] if ends else ""
        ids = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=n)["input_ids"]
        return self.tokenizer.decode(ids)

    def _joint_strings(self, pairs, prepared_ok=False):
        """Build what the original tokenizes; returns (joint strings, character offset where the text starts).
        ``prepared_ok``: texts may be prepared already (:meth:`tokenize`), see :meth:`_preparer`."""
        joints, cuts, texts = [], [], []
        prepare = self._preparer(idempotent=prepared_ok)
        plain = prepare is _unchanged
        for instruction, text in pairs:
            if plain and not instruction and SEPARATOR not in text:  # what the marking below gives, without it
                joints.append(text)
                cuts.append(0)
                texts.append(text)
                continue
            marked = f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"
            parts = prepare(marked).split(SEPARATOR)
            cuts.append(len(parts[0]) if len(parts) > 1 else None)
            joints.append("".join(parts))
            texts.append(parts[1] if len(parts) > 1 else "")
        return joints, cuts, texts

    def tokenize_items(self, pairs, prepared_ok=False):
        """Tokenize ``(instruction, text)`` pairs: token ids (list of int32 arrays) and pooled-span starts.

        One batched tokenizer call with character offsets; only texts near ``doc_max_length`` are tokenized again.
        ``prepared_ok``: texts may carry :meth:`prepare_for_tokenization`'s wrapping already (not added twice).
        """
        ids, n_text = self._encode_joint(pairs, prepared_ok)
        # near the word-truncation limit: apply the original's rule exactly (rare for sentence-length inputs)
        long = [i for i, n in enumerate(n_text) if n > self.doc_max_length - 16]
        if long:
            ids2, n2 = self._encode_joint([(pairs[i][0], self._shorten(pairs[i][1])) for i in long], prepared_ok)
            for k, i in enumerate(long):
                ids[i] = ids2[k]
                n_text[i] = n2[k]
        if self.skip_instruction:
            # the original pools the last n positions, n = the text's own token count
            starts = np.array([len(x) - n for x, n in zip(ids, n_text, strict=True)], dtype=np.int32)
        else:
            starts = np.zeros(len(ids), dtype=np.int32)
        return ids, np.maximum(starts, 0), np.asarray(n_text)

    def _encode_joint(self, pairs, prepared_ok=False):
        """One batched call on the joint strings: (token ids, one int32 array per item; the text's token counts).
        The count comes from offsets, or (``instruction_span="compat"``, the default) from one more batched call on
        the instructed items' texts alone, which is what the original counts: " Orange" inside a joint string is one
        token, "Orange" alone two."""
        joints, cuts, texts = self._joint_strings(pairs, prepared_ok)
        # character offsets only where an instruction precedes the text (they cost ~20 % of the tokenizer's time)
        ids, special, offsets = self._tokenize_batch(joints, True, any(cuts))
        n_text = self._count_text_tokens(special, offsets, cuts)
        lost = [i for i, (c, n) in enumerate(zip(cuts, n_text, strict=True)) if c and not n and texts[i].strip()]
        if lost:
            logger.warning("%d input(s) (first: %d) have an instruction that fills max_length=%d tokens alone: their "
                           "text was cut off entirely, and the embedding does not come from it (shorten the "
                           "instruction or raise max_length)", len(lost), lost[0], self.max_length)
        if self.instruction_span == "compat":
            instructed = [i for i, c in enumerate(cuts) if c]
            if instructed:
                alone = self._tokenize_batch([texts[i] for i in instructed], False, False)[0]
                for i, a in zip(instructed, alone, strict=True):
                    n_text[i] = min(len(a), len(ids[i]))
        return ids, n_text

    def _tokenize_batch(self, strings, add_special_tokens, offsets):
        """``tokenizer(strings, truncation=True, max_length=self.max_length, ...)``'s ids (int32 arrays), special-
        token masks and (with ``offsets``) character offsets. A fast tokenizer's Rust backend is called directly,
        configured by the tokenizer's own ``set_truncation_and_padding`` as its ``__call__`` configures it: the same
        tokens, without the per-item Python dicts of attention masks and type ids that ``__call__`` builds (over half
        of the host side's time on short sentences)."""
        backend = self._rust_backend()
        if backend is None:
            enc = self.tokenizer(strings, add_special_tokens=add_special_tokens, truncation=True,
                                 max_length=self.max_length, return_offsets_mapping=offsets,
                                 return_special_tokens_mask=True)
            return ([np.asarray(x, dtype=np.int32) for x in enc["input_ids"]], enc["special_tokens_mask"],
                    enc["offset_mapping"] if offsets else None)
        encodings = backend.encode_batch(strings, add_special_tokens=add_special_tokens)
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        special = [e.special_tokens_mask for e in encodings]
        return ids, special, ([e.offsets for e in encodings] if offsets else None)

    def _rust_backend(self):
        """The fast tokenizer's ``tokenizers.Tokenizer``, set to truncate at ``max_length`` without padding exactly
        as ``tokenizer.__call__`` sets it before each call; None for slow tokenizers or with ``FAST_TOKENIZE`` off."""
        tok = self.tokenizer
        backend = getattr(tok, "_tokenizer", None)
        if not FAST_TOKENIZE or backend is None or not hasattr(backend, "encode_batch") \
                or not hasattr(tok, "set_truncation_and_padding"):
            return None
        from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

        tok.set_truncation_and_padding(padding_strategy=PaddingStrategy.DO_NOT_PAD,
                                       truncation_strategy=TruncationStrategy.LONGEST_FIRST,
                                       max_length=self.max_length, stride=0, pad_to_multiple_of=None,
                                       padding_side=None)
        split = getattr(tok, "split_special_tokens", False)
        if backend.encode_special_tokens != split:
            backend.encode_special_tokens = split
        return backend

    @staticmethod
    def _count_text_tokens(special, offsets, cuts):
        counts = []
        for i, cut in enumerate(cuts):
            sp = special[i]
            if cut is None:  # no text marker survived: nothing to pool
                counts.append(0)
            elif cut == 0:
                counts.append(len(sp) - sum(sp))
            else:
                counts.append(sum(1 for (_, end), s in zip(offsets[i], sp, strict=True) if not s and end > cut))
        return counts

    def tokenize(self, items, prepared_ok=True):
        """Packed features for ``items`` (strings or ``[instruction, text]`` pairs), ready for :meth:`forward`.

        A string in the original's own form, ``"instruction; " + SEPARATOR + "text"`` (``SEPARATOR`` is
        ``"!@#$%^&*()"``, as its training collators build them, usually after ``prepare_for_tokenization``), is the
        pair it stands for: the instruction attends but is not pooled, and a prepared text is not prepared twice.
        ``prepared_ok=False`` wraps every text as :meth:`encode` does (raw texts that may end with the eos string).

        Returns a dict: ``input_ids`` int64 ``[T]``, ``position_ids`` int64 ``[T]``, ``cu_seqlens`` int32
        ``[B + 1]``, ``max_seqlen`` int, ``pool_start`` int32 ``[B]`` (instruction tokens at each sequence start),
        ``cu_seqlens_host`` and ``pool_start_host`` (numpy copies of ``cu_seqlens`` and ``pool_start`` that stay on
        the host, so that the forward and the pooling need no device-to-host copy). These are packed features, not
        the original's padded ``attention_mask`` / ``embed_mask``; :meth:`forward` takes either.
        """
        pairs = [tuple(t.split(SEPARATOR, 1)) if not i and SEPARATOR in t else (i, t)
                 for i, t in _normalize_inputs(items)]
        ids, starts, _ = self.tokenize_items(pairs, prepared_ok=prepared_ok)
        return pack(ids, starts)

    # ------------------------------------------------------------------ model
    def forward(self, features):
        """Pooled embeddings ``[B, H]`` of packed features (differentiable; used by training). The original's padded
        features (``input_ids`` and ``attention_mask`` ``[B, L]``, padded on either side, with an optional
        ``embed_mask`` marking the pooled tokens) are packed first."""
        if "cu_seqlens" not in features and "attention_mask" in features:
            features = self._packed_from_padded(features)
        n = features["cu_seqlens"].numel() - 1
        f, hidden = self._run(features)
        return pool(hidden, f["cu_seqlens"], self.pooling_mode, f["pool_start"])[:n]

    def _packed_from_padded(self, features):
        ids, mask = features["input_ids"], features["attention_mask"].bool()
        embed = features.get("embed_mask")
        if ids.dim() != 2 or mask.shape != ids.shape or (embed is not None and embed.shape != ids.shape):
            raise ValueError(f"padded features need input_ids and attention_mask (and embed_mask) of one [B, L] "
                             f"shape, got {tuple(ids.shape)}, {tuple(mask.shape)}"
                             + (f", {tuple(embed.shape)}" if embed is not None else ""))
        rows = [ids[i][mask[i]].cpu().numpy() for i in range(ids.shape[0])]
        starts = []
        for i, row in enumerate(rows):
            pooled = int(embed[i][mask[i]].sum()) if embed is not None and self.skip_instruction else 0
            # the original pools the last n real tokens (n = the text's tokens); no embed_mask, or an empty one:
            # every token
            starts.append(len(row) - pooled if pooled else 0)
        return pack(rows, np.asarray(starts, dtype=np.int32))

    def get_pooling(self, features, last_hidden_states):
        """The original's pooling step: ``last_hidden_states`` ``[T, H]`` of packed ``features`` (or ``[B, L, H]``
        of the original's padded features) pooled with this encoder's mode, ``[B, H]``."""
        if "cu_seqlens" not in features:
            mask = features["attention_mask"].bool()
            features = self._packed_from_padded(features)
            last_hidden_states = last_hidden_states[mask]
        n = features["cu_seqlens"].numel() - 1
        return pool(last_hidden_states, features["cu_seqlens"].to(last_hidden_states.device), self.pooling_mode,
                    features["pool_start"].to(last_hidden_states.device))[:n]

    def _convert_to_str(self, instruction, text):
        """The original's joint string of an ``[instruction, text]`` pair (``doc_max_length`` word cut applied), as
        :meth:`tokenize` reads it back."""
        text = self._shorten(text)
        return f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"

    def _skip_instruction(self, sentence_feature):
        """The original's: padded features pool only the ``embed_mask`` tokens (packed ones carry ``pool_start``)."""
        if "embed_mask" in sentence_feature:
            sentence_feature["attention_mask"] = sentence_feature["embed_mask"]

    @staticmethod
    def _text_length(text):
        """The original's length of an input for sorting: characters of a string, items of a list, the sum over a
        tuple of lists."""
        if isinstance(text, str) or (isinstance(text, list) and text and isinstance(text[0], int)) or not len(text):
            return len(text)
        if isinstance(text, dict):
            return len(next(iter(text.values())))
        return sum(len(t) for t in text)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Forwarded to the model (the Hugging Face Trainer calls it with ``gradient_checkpointing=True``)."""
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None):
        """Forwarded to the model, as the original does."""
        return self.model.resize_token_embeddings(new_num_tokens=new_num_tokens,
                                                  pad_to_multiple_of=pad_to_multiple_of)

    def _run(self, features):
        """(features on the model's device, last hidden states ``[T, H]``); a tiny CPU batch gets a filler sequence
        after its own, so the first ``B + 1`` entries of ``cu_seqlens`` still describe the caller's sequences."""
        device = self.device
        f = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}
        if device.type == "cpu" and 0 < f["input_ids"].numel() < _MIN_CPU_TOKENS:
            f = _add_filler(f, _MIN_CPU_TOKENS - f["input_ids"].numel())
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            # the fused ops' Triton kernels launch on the current device: make it the model's (cuda:1 while cuda:0
            # is current, or a server's encode thread, which starts on device 0)
            with torch.cuda.device(device):
                return f, self.hidden_states(f)
        return f, self.hidden_states(f)

    def hidden_states(self, f):
        """Last hidden states ``[T, H]`` of a packed batch."""
        cu, m = f["cu_seqlens"], int(f["max_seqlen"])
        host = f.get("cu_seqlens_host")
        if host is not None and len(host) == cu.numel() and (cu.is_cuda or _TRITON_INTERPRET):
            # the attention kernels (CUDA, or the interpreter's tests) then validate and order the pack from the host
            # copy: no device-to-host copy (a synchronisation) in the forward
            from .kernels.attention import prime_seq_info
            from .kernels.pooling import prime_pool_args

            prime_seq_info(cu, host, m)
            if f.get("pool_start_host") is not None:  # and pooling (LLM2Vec.forward) validates from host copies too
                prime_pool_args(cu, f["pool_start"], host, f["pool_start_host"])
        out = self.model(input_ids=f["input_ids"][None], position_ids=f["position_ids"][None],
                         cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[0]

    # ------------------------------------------------------------------ encode
    def encode(self, sentences, batch_size=None, show_progress_bar=True, convert_to_numpy=False,
               convert_to_tensor=False, device=None, normalize_embeddings=False, max_batch_tokens=None,
               prompt_name=None, prompt=None, precision="float32", truncate_dim=None, pool=None, chunk_size=None,
               output_value="sentence_embedding", quantization_ranges=None, _progress=None):
        """Embed texts. Rows come back in input order.

        Args:
            sentences: a string, a list of strings, a list of ``[instruction, text]`` pairs, or a mix.
            batch_size: with ``max_length`` sets the token budget, ``batch_size × max_length`` tokens per packed
                batch (the original's memory bound; short texts then share a batch). ``None`` (default): the
                device's default budget, :func:`default_batch_tokens`.
            show_progress_bar: a tqdm bar over texts.
            convert_to_numpy / convert_to_tensor: numpy float32 array, or a torch float32 tensor (the default, on
                the CPU, as the original returns).
            device: where to run (the model moves there); default: where the model is. A list of devices (e.g.
                ``["cuda:0", "cuda:1"]``) encodes data-parallel with one process per device for this call.
            normalize_embeddings: L2-normalise each row.
            max_batch_tokens: token budget per packed batch (overrides the default above).
            prompt_name: a name from ``self.prompts`` (e.g. ``"query"``): its instruction goes to every plain-string
                item. ``prompt``: the same with the instruction given directly.
            precision: ``float32`` (default), ``int8``, ``uint8``, ``binary`` or ``ubinary`` (numpy output, as
                sentence-transformers' ``quantize_embeddings``; int8/uint8 ranges come from this call's rows unless
                ``quantization_ranges`` gives them).
            quantization_ranges: ``[2, D]`` per-dimension minimum and maximum for int8/uint8 (e.g.
                ``llm2vec_fast.quantization.quantization_ranges`` of a representative set, or an
                :meth:`encode_to_disk` manifest's ``quantization_ranges``), so that queries and corpus share one
                scale; needed for fewer than two texts.
            truncate_dim: keep the first ``truncate_dim`` dimensions (Matryoshka-style); with
                ``normalize_embeddings`` the truncated rows are renormalised.
            pool: a pool from :meth:`start_multi_process_pool`: encode data-parallel on its worker processes.
            chunk_size: texts per work unit handed to a pool worker (default: about an eighth of each worker's
                share, at most 5,000).
            output_value: ``"sentence_embedding"`` (default) or ``"token_embeddings"`` (sentence-transformers'
                names): the last hidden state of every pooled token instead (the text's tokens; the instruction's
                too when ``skip_instruction=False``), as a list with one float32 ``[L_i, H]`` tensor per input
                (numpy arrays with ``convert_to_numpy``), for late-interaction scoring. ``normalize_embeddings`` and
                ``truncate_dim`` apply to each token vector; ``precision`` must be ``float32``; one process only.

        Returns ``[N, H]`` (``[H]`` for a single string). Empty or whitespace-only texts (after the instruction)
        have nothing to pool: their rows are zero vectors. Texts longer than ``max_length`` tokens are cut at the
        end (after ``doc_max_length`` word truncation, as in the original).
        """
        from .quantization import PRECISIONS, quantize_embeddings, truncate_embeddings

        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        if output_value not in _OUTPUT_VALUES:
            raise ValueError(f"unknown output_value {output_value!r}; expected one of {_OUTPUT_VALUES}")
        instruction = self._prompt(prompt_name, prompt)
        if precision in ("int8", "uint8") and quantization_ranges is None and output_value == "sentence_embedding" \
                and (isinstance(sentences, str) or (hasattr(sentences, "__len__") and len(sentences) == 1)):
            raise ValueError(f"precision={precision!r} takes each dimension's range from the texts encoded together, "
                             "and one text gives no range: pass quantization_ranges= (a [2, D] array, e.g. "
                             "llm2vec_fast.quantization.quantization_ranges(embeddings of a representative set), or "
                             "an encode_to_disk manifest's quantization_ranges)")
        if quantization_ranges is not None and precision not in ("int8", "uint8"):
            raise ValueError(f"quantization_ranges apply to int8/uint8 only, got precision={precision!r}")
        width = getattr(self.model.config.get_text_config(), "hidden_size", None)
        if truncate_dim is not None and width:
            truncate_embeddings(torch.zeros(1, width), truncate_dim)  # its checks, before any text is encoded
        normalize = normalize_embeddings and truncate_dim is None
        if output_value == "token_embeddings":
            if precision != "float32":
                raise ValueError(f"token embeddings come as float32 only, got precision={precision!r}")
            if pool is not None or isinstance(device, (list, tuple)):
                raise ValueError("token embeddings are computed in one process: pass one device, not a pool or a "
                                 f"device list (got pool={pool!r}, device={device!r})")
            out = self._encode(sentences, batch_size, show_progress_bar, device, normalize, max_batch_tokens,
                               instruction, tokens=True)
            many = out if isinstance(out, list) else [out]
            if truncate_dim is not None:
                many = [truncate_embeddings(t, truncate_dim, renormalize=normalize_embeddings) for t in many]
            if convert_to_numpy and not convert_to_tensor:
                many = [t.numpy() for t in many]
            return many if isinstance(out, list) else many[0]
        if pool is not None or isinstance(device, (list, tuple)):
            out = self._encode_parallel(sentences, pool, device, chunk_size, batch_size, show_progress_bar,
                                        normalize, max_batch_tokens, instruction)
        else:
            out = self._encode(sentences, batch_size, show_progress_bar, device, normalize, max_batch_tokens,
                               instruction, progress=_progress)
        if truncate_dim is not None:
            out = truncate_embeddings(out, truncate_dim, renormalize=normalize_embeddings)
        if precision != "float32":
            q = quantize_embeddings(out.reshape(-1, out.shape[-1]), precision, ranges=quantization_ranges)
            q = q.reshape(*out.shape[:-1], q.shape[-1])  # an empty input keeps its [0, width]
            return torch.from_numpy(q) if convert_to_tensor else q
        if convert_to_tensor:
            return out
        if convert_to_numpy:
            return out.numpy()
        return out

    def encode_queries(self, queries, **kwargs):
        """``encode`` with the stored ``"query"`` prompt (if any) on plain-string queries."""
        kwargs.setdefault("prompt_name", "query" if "query" in self.prompts else None)
        return self.encode(queries, **kwargs)

    def encode_corpus(self, corpus, **kwargs):
        """``encode`` for documents: the stored ``"document"`` prompt (if any); dicts with ``title``/``text`` are
        joined as ``title + " " + text`` (BEIR style)."""
        if isinstance(corpus, dict):  # one document, or {doc_id: document}
            corpus = [corpus] if "text" in corpus or "title" in corpus else list(corpus.values())
        if isinstance(corpus, (list, tuple)) and any(isinstance(d, dict) for d in corpus):
            corpus = [_document_text(d, i) for i, d in enumerate(corpus)]
        kwargs.setdefault("prompt_name", "document" if "document" in self.prompts else None)
        return self.encode(corpus, **kwargs)

    def _prompt(self, prompt_name, prompt):
        if prompt_name is not None and prompt is not None:
            raise ValueError("give prompt_name or prompt, not both")
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"unknown prompt name {prompt_name!r}; stored prompts: {sorted(self.prompts)}")
            return self.prompts[prompt_name]
        return prompt

    def encode_to_disk(self, sentences, output_dir, chunk_size=100_000, resume=True, show_progress_bar=True,
                       **encode_kwargs):
        """Stream embeddings of an iterable of any size to ``output_dir`` as ``.npy`` shards of ``chunk_size`` rows.

        Inputs are read lazily (a generator over a huge file works); each shard is written atomically, and
        ``manifest.json`` says ``"complete": false`` until the last shard lands, then lists every shard. With
        ``resume``, shards already present from an interrupted run are skipped when they hold the same inputs (a
        hash of each chunk's items is kept per shard) embedded with the same settings: the model (its path and a
        fingerprint of its weights, so a model retrained into the same folder counts as another), pooling, lengths,
        chunk size and the effective value of every encode option (an option passed at its default is the same as
        one left out; a ``prompt_name`` counts by the instruction it stands for). A folder that holds other inputs
        or settings raises ``ValueError`` instead of being mixed in. Shard files a previous, longer run left behind
        are removed at the end. ``precision="int8"`` / ``"uint8"`` quantize every shard with one set of
        per-dimension ranges, ``quantization_ranges`` when given, else taken from the first shard, kept in the
        manifest (``quantization_ranges``; quantize queries with them), so shards stay comparable. The progress bar
        counts texts (with a total when ``sentences`` has a length). Returns the manifest.
        """
        import hashlib

        from .quantization import PRECISIONS

        check_count("chunk_size", chunk_size)
        precision = encode_kwargs.pop("precision", "float32")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        if encode_kwargs.get("output_value", "sentence_embedding") != "sentence_embedding":
            raise ValueError(f"encode_to_disk writes sentence embeddings only, got output_value="
                             f"{encode_kwargs['output_value']!r}")
        for key in ("convert_to_numpy", "convert_to_tensor"):
            if key in encode_kwargs:
                raise ValueError(f"encode_to_disk does not take {key}= (shards are numpy arrays)")

        out = Path(output_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"output_dir {str(out)!r} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        manifest_path = out / "manifest.json"
        given_ranges = encode_kwargs.pop("quantization_ranges", None)
        # what the shards' numbers depend on; how they are computed (batching, devices, progress) is left out
        import inspect

        options = {name: encode_kwargs.get(name, prm.default)
                   for name, prm in inspect.signature(self.encode).parameters.items()
                   if prm.default is not inspect.Parameter.empty and not name.startswith("_")
                   and name not in ("batch_size", "max_batch_tokens", "chunk_size", "pool", "device",
                                    "show_progress_bar", "convert_to_numpy", "convert_to_tensor", "precision",
                                    "output_value", "quantization_ranges")}
        unknown = sorted(set(encode_kwargs) - set(options) - {"batch_size", "max_batch_tokens", "chunk_size", "pool",
                                                               "device"})
        if unknown:
            raise TypeError(f"encode_to_disk got unexpected encode option(s) {unknown}")
        options["instruction"] = self._prompt(options.pop("prompt_name"), options.pop("prompt"))
        name = getattr(self.model.config, "_name_or_path", None)
        if name and Path(name).exists():
            name = str(Path(name).resolve())  # "tiny", "./tiny/" and its absolute path are one model folder
        settings = {"model": name,
                    "weights": _weights_fingerprint(self.model), "pooling_mode": self.pooling_mode,
                    "max_length": self.max_length, "doc_max_length": self.doc_max_length,
                    "skip_instruction": self.skip_instruction, "chunk_size": chunk_size, "precision": precision,
                    **dict(sorted(options.items()))}
        if given_ranges is not None:
            given_ranges = np.asarray(given_ranges.cpu() if hasattr(given_ranges, "cpu") else given_ranges,
                                      dtype=np.float32)
            settings["quantization_ranges_sha1"] = hashlib.sha1(given_ranges.tobytes()).hexdigest()
        settings = json.loads(json.dumps(settings, default=repr))
        old = json.loads(manifest_path.read_text()) if manifest_path.exists() and resume else {}
        if old:
            before = old.get("settings") or {"chunk_size": old.get("chunk_size"),
                                             "precision": old.get("precision", "float32")}
            # older manifests: the keys they recorded (two, or the options passed explicitly)
            keys = set(before) | set(settings) if old.get("settings_version") == 2 else set(before)
            changed = sorted(k for k in keys if before.get(k) != settings.get(k))
            if changed == ["model"] and before.get("weights") and before.get("weights") == settings.get("weights"):
                changed = []  # the same weights, the folder's path spelled another way
            if changed:
                raise ValueError(f"{out} holds shards made with other settings ("
                                 + ", ".join(f"{k}: {before.get(k)!r}, now {settings.get(k)!r}" for k in changed)
                                 + "); use another folder or resume=False")
        manifest = {"complete": False, "chunk_size": chunk_size, "rows": 0, "dim": None, "shards": [],
                    "model": settings["model"], "pooling_mode": self.pooling_mode, "precision": precision,
                    "settings": settings, "settings_version": 2}
        ranges = old.get("quantization_ranges") if given_ranges is None else given_ranges.tolist()
        if ranges is not None:
            manifest["quantization_ranges"] = ranges
            ranges = np.asarray(ranges, dtype=np.float32)
        previous = {sh["file"]: sh for sh in old.get("shards", [])}

        def write_manifest(index):
            # the shards done so far, then the earlier run's later ones (not checked yet, still resumable): a run
            # that stops or is refused half-way leaves the folder as resumable as it found it
            later = [sh for f, sh in previous.items() if _shard_index(f) > index]
            _atomic_write_text(manifest_path, json.dumps({**manifest, "shards": manifest["shards"] + later},
                                                         indent=2))

        lock = _FolderLock(out)
        it = iter([sentences] if isinstance(sentences, str) else sentences)
        total = 1 if isinstance(sentences, str) else len(sentences) if hasattr(sentences, "__len__") else None
        bar = tqdm(total=total, desc="Encoding to disk", unit="text", disable=not show_progress_bar)
        # one process: encode advances this bar text by text; with a pool or a device list, shard by shard
        inner = bar if encode_kwargs.get("pool") is None and not isinstance(encode_kwargs.get("device"),
                                                                             (list, tuple)) else None
        with lock:
            self._write_shards(it, out, chunk_size, previous, manifest, write_manifest, precision, ranges, inner, bar,
                               encode_kwargs)
        bar.close()
        return manifest

    def _write_shards(self, it, out, chunk_size, previous, manifest, write_manifest, precision, ranges, inner, bar,
                      encode_kwargs):
        """encode_to_disk's loop, run while it holds the folder's lock."""
        import hashlib
        import itertools

        from .quantization import quantization_ranges, quantize_embeddings

        manifest_path = out / "manifest.json"
        for index in itertools.count():
            chunk = list(itertools.islice(it, chunk_size))
            if not chunk:
                break
            name = f"embeddings-{index:05d}.npy"
            digest = hashlib.sha1(json.dumps(chunk, ensure_ascii=False, default=repr).encode()).hexdigest()
            done = previous.get(name)
            if done is not None and done.get("sha1") not in (None, digest):
                raise ValueError(f"{out / name} holds the embeddings of other inputs than chunk {index} of these "
                                 f"({done['rows']} rows); use another folder or resume=False")
            if done is not None and done.get("sha1") == digest and done["rows"] == len(chunk) \
                    and (out / name).exists():
                dim, encoded = done["dim"], False
            else:
                encoded = True
                if precision in ("int8", "uint8") and ranges is None and len(chunk) < 2:
                    raise ValueError(f"precision={precision!r} takes each dimension's range from the first shard, "
                                     f"and its {len(chunk)} text gives none: pass quantization_ranges= (a [2, D] "
                                     "array from a representative set) or use a larger chunk_size")
                emb = self.encode(chunk, show_progress_bar=False, convert_to_numpy=True, _progress=inner,
                                  **encode_kwargs)
                if precision in ("int8", "uint8"):
                    if ranges is None:
                        ranges = quantization_ranges(emb)
                        manifest["quantization_ranges"] = ranges.tolist()
                    emb = quantize_embeddings(emb, precision, ranges=ranges)
                elif precision != "float32":
                    emb = quantize_embeddings(emb, precision)
                _atomic_save(out / name, emb)
                dim = int(emb.shape[1]) if emb.ndim == 2 else int(emb.shape[-1])
            manifest["shards"].append({"file": name, "rows": len(chunk), "dim": dim, "sha1": digest})
            manifest["rows"] += len(chunk)
            manifest["dim"] = dim
            if encoded:  # a reused shard changes nothing the manifest says
                write_manifest(index)
            if inner is None or not encoded:
                bar.update(len(chunk))
        listed = {sh["file"] for sh in manifest["shards"]}
        for stale in [*out.glob("embeddings-*.npy"), *out.glob("embeddings-*.npy.partial")]:
            if stale.name not in listed:
                stale.unlink()
        manifest["complete"] = True
        _atomic_write_text(manifest_path, json.dumps(manifest, indent=2))

    @staticmethod
    def similarity(embeddings1, embeddings2, fn="cosine"):
        """All-pairs similarity ``[N1, N2]`` of embeddings: ``cosine`` (default), ``dot``, or negative
        ``euclidean`` / ``manhattan`` distance (sentence-transformers' ``similarity``)."""
        from .similarity import similarity

        return similarity(embeddings1, embeddings2, fn)

    @staticmethod
    def similarity_pairwise(embeddings1, embeddings2, fn="cosine"):
        """Row-wise similarity ``[N]`` of two equally shaped embedding sets (same functions as :meth:`similarity`)."""
        from .similarity import similarity_pairwise

        return similarity_pairwise(embeddings1, embeddings2, fn)

    # ------------------------------------------------------------------ data-parallel encoding
    def start_multi_process_pool(self, target_devices=None, threads_per_worker=None, load="share"):
        """Start one encode worker process per device (sentence-transformers' name); pass it as ``encode(pool=)``.

        ``target_devices``: e.g. ``["cuda:0", "cuda:1"]``; default every CUDA device, else two CPU workers. Each
        worker holds a copy of the model. ``load="share"`` (default) sends this object's model through shared host
        memory (exact, including weights changed in memory; the parent's model briefly visits the CPU, and
        ``/dev/shm`` must hold it). ``load="reload"``: each worker loads it again with this object's
        ``from_pretrained`` arguments (no shared memory: for big models in containers with a small ``/dev/shm``);
        encoder settings (pooling, lengths, prompts) are copied over. Close the pool with
        :meth:`stop_multi_process_pool` or use it as a context manager.
        """
        from .multiprocess import EncodePool

        if target_devices is None:
            n = torch.cuda.device_count()
            target_devices = [f"cuda:{i}" for i in range(n)] if n else ["cpu", "cpu"]
        return EncodePool(self, target_devices, threads_per_worker, load)

    @staticmethod
    def stop_multi_process_pool(pool):
        pool.close()

    def encode_multi_process(self, sentences, pool, chunk_size=None, **kwargs):
        """``encode(sentences, pool=pool, ...)`` under sentence-transformers' older name."""
        return self.encode(sentences, pool=pool, chunk_size=chunk_size, **kwargs)

    def _encode_parallel(self, sentences, pool, devices, chunk_size, batch_size, show_progress_bar, normalize,
                         max_batch_tokens, instruction):
        single = isinstance(sentences, str)
        pairs = _instructed_pairs(sentences, instruction)
        _check_budget_args(batch_size, max_batch_tokens)
        own = pool is None
        if own:
            pool = self.start_multi_process_pool(list(devices))
        try:
            out = pool.encode(pairs, chunk_size, show_progress_bar, batch_size=batch_size,
                              max_batch_tokens=max_batch_tokens, normalize_embeddings=normalize)
        finally:
            if own:
                pool.close()
        return out[0] if single else out

    @torch.inference_mode()
    def _encode(self, sentences, batch_size, show_progress_bar, device, normalize_embeddings, max_batch_tokens,
                instruction=None, tokens=False, progress=None):
        single = isinstance(sentences, str)
        pairs = _instructed_pairs(sentences, instruction)
        _check_budget_args(batch_size, max_batch_tokens)
        if device is not None:
            self.model.to(_check_device(device))
        self.model.eval()
        dev = self.device
        budget = max_batch_tokens or (batch_size * self.max_length if batch_size else
                                      default_batch_tokens(self.model.config, dev, self.max_length,
                                                           dtype=next(self.model.parameters()).dtype))
        width = self.model.config.hidden_size
        # tokens: one [L_i, H] tensor per input (an empty text has none)
        out = [torch.zeros(0, width)] * len(pairs) if tokens else torch.zeros(len(pairs), width, dtype=torch.float32)

        live = [i for i, (_, t) in enumerate(pairs) if t.strip()]
        if len(live) < len(pairs):
            logger.info("%d empty or whitespace-only texts embed to zero vectors", len(pairs) - len(live))
        # `progress`: a caller's bar (encode_to_disk's, over all shards) to advance instead of one of our own
        bar = progress if progress is not None else tqdm(total=len(pairs), desc="Encoding", unit="text",
                                                          disable=not show_progress_bar)
        bar.update(len(pairs) - len(live))
        dtype = next(self.model.parameters()).dtype

        def collect(rows, emb, spans=None):
            # waits for this batch only; the next one is already queued on the device
            emb = emb.cpu()
            if spans is None:
                ok = torch.isfinite(emb).all(-1).tolist()
            else:  # token rows: each input's pooled span of the packed hidden states
                spans = spans.cpu().tolist()
                pieces = [emb[a:b].clone() for a, b in spans]
                ok = [bool(torch.isfinite(t).all()) for t in pieces]
            if not all(ok):
                bad = [r for r, good in zip(rows, ok, strict=True) if not good]
                raise FloatingPointError(f"non-finite embeddings for inputs {bad[:10]} (dtype {dtype}); try "
                                         "dtype=torch.float32")
            if spans is None:
                out.index_copy_(0, torch.as_tensor(rows), emb)
            else:
                for r, t in zip(rows, pieces, strict=True):
                    out[r] = t
            bar.update(len(rows))

        # CPU: freed activations stay in the heap for the next batch instead of being mapped afresh (cpu_memory)
        with cpu_work(dev):
            # one background thread tokenizes, packs and copies ahead; batch i is collected after batch i + 1 is
            # launched, so the device never waits for the host between batches
            pending = None
            stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None
            for rows, feats, skipped in _ahead(self._packed_batches(pairs, live, budget, dev, stream), depth=2):
                bar.update(skipped)
                if feats is None:
                    continue
                if tokens:
                    f, emb = self._run(feats)
                    n = len(rows)
                    spans = torch.stack([f["cu_seqlens"][:n].long() + f["pool_start"][:n].long(),
                                         f["cu_seqlens"][1:n + 1].long()], dim=1)
                    emb = emb.float()
                else:
                    emb, spans = self.forward(feats).float(), None
                if normalize_embeddings:
                    emb = torch.nn.functional.normalize(emb, dim=-1)
                if pending is not None:
                    collect(*pending)
                pending = rows, emb, spans
            if pending is not None:
                collect(*pending)
        if progress is None:
            bar.close()
        return out[0] if single else out

    def _packed_batches(self, pairs, live, budget, device, stream=None):
        """Yield ``(rows, packed features on device, texts skipped)`` for the texts ``live`` of ``pairs``.

        Texts are tokenized in chunks that grow from ``_FIRST_CHUNK`` to ``_TOKENIZE_CHUNK`` texts, so the device
        starts after a few dozen texts instead of after the whole input; within a chunk they are sorted longest
        first and cut into ``budget``-token batches. The last, partly filled batch of a chunk is not run: its texts
        join the next chunk, so that batches are full. Except while the chunks still grow: a chunk smaller than
        ``_TOKENIZE_CHUNK`` that fills no whole batch runs at once, so the device works on it while the next,
        twice larger chunk is tokenized, instead of idling until a full budget of texts is ready
        (``_EARLY_PARTIAL``). The batches depend on the input only, never on timing. ``stream``: the consumer's CUDA
        stream, which the copies to the device join (this generator runs on a thread of its own, whose current
        stream would otherwise be the default one, unordered with a caller's ``torch.cuda.stream(...)``).
        """
        pin = device.type == "cuda"
        held = []  # (row, ids, pool start) carried into the next chunk
        size, at = min(_FIRST_CHUNK, _TOKENIZE_CHUNK), 0
        while at < len(live) or held:
            chunk = live[at:at + size]
            at += len(chunk)
            size = min(2 * size, _TOKENIZE_CHUNK)
            last = at >= len(live)
            items = list(held)
            held = []
            skipped = 0
            if chunk:
                ids, starts, n_text = self.tokenize_items([pairs[i] for i in chunk])
                for k, row in enumerate(chunk):
                    if n_text[k] > 0 or not self.skip_instruction:
                        items.append((row, ids[k], starts[k]))
                    else:
                        skipped += 1  # nothing left to pool once the instruction is skipped: a zero vector
            if skipped:
                yield [], None, skipped
            if not items:
                continue
            lengths = np.array([len(x[1]) for x in items], dtype=np.int64)
            order = np.argsort(-lengths, kind="stable")  # longest first: a memory error shows at once
            batches = _budget_batches(lengths[order], budget)
            if not last and len(batches) > 1:
                held = [items[order[j]] for j in batches.pop()]
            elif not last and not (_EARLY_PARTIAL and len(chunk) < _TOKENIZE_CHUNK):
                held = [items[j] for j in order]  # one batch, not yet full: wait for more texts
                continue
            for sel in batches:
                chosen = [items[order[j]] for j in sel]
                feats = pack([x[1] for x in chosen], [x[2] for x in chosen])
                if pin:
                    with torch.cuda.stream(stream):
                        feats = {k: (v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor)
                                     else v) for k, v in feats.items()}
                yield [x[0] for x in chosen], feats, 0


# ---------------------------------------------------------------------- helpers
def _instructed_pairs(sentences, instruction):
    """(instruction, text) pairs of ``sentences``, ``instruction`` given to the items that have none."""
    pairs = _normalize_inputs(sentences)
    if instruction:
        pairs = [(instruction, t) if not i else (i, t) for i, t in pairs]
    return pairs


def _check_budget_args(batch_size, max_batch_tokens):
    for name, v in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
        if v is not None:
            check_count(name, v)


def _normalize_inputs(sentences):
    """str | list[str | [instruction, text]] → list of (instruction, text); errors name the bad item. A tuple at the
    top is a sequence of items like a list (as the original and sentence-transformers read it): a single pair is
    ``[[instruction, text]]``."""
    if isinstance(sentences, str):
        return [("", sentences)]
    if not isinstance(sentences, (list, tuple)):
        if isinstance(sentences, np.ndarray):
            sentences = sentences.tolist()
        elif hasattr(sentences, "__len__") and hasattr(sentences, "__iter__") and not isinstance(sentences, dict):
            sentences = list(sentences)  # a datasets Column, a pandas Series' values: any sized sequence of items
        else:
            raise TypeError(f"sentences must be a string or a list of strings / [instruction, text] pairs, got "
                            f"{type(sentences).__name__}")
    if _is_medi_item(sentences):
        sentences = [sentences]  # one [instruction, text, id] item given alone, as the original reads it
    pairs = []
    for i, item in enumerate(sentences):
        if isinstance(item, str):
            pairs.append(("", item))
        elif isinstance(item, (list, tuple)):
            if not (len(item) == 2 or _is_medi_item(item)) or not all(isinstance(x, str) for x in item[:2]):
                raise ValueError(f"item {i} must be a string or an [instruction, text] pair of two strings (an "
                                 f"[instruction, text, id] triple too), got {_short(item)}")
            pairs.append((item[0], item[1]))
        else:
            raise TypeError(f"item {i} must be a string or an [instruction, text] pair, got "
                            f"{type(item).__name__}: {_short(item)}")
    return pairs


def _is_medi_item(item) -> bool:
    # MTEB's MEDI / INSTRUCTOR inputs: [instruction, text, int id]; the original encodes the first two
    return (isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[0], str)
            and isinstance(item[1], str) and isinstance(item[2], int) and not isinstance(item[2], bool))


def _atomic_save(path, array):
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:  # a full disk, a file size limit: numpy says only "N requested and M written"
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from e


def _shard_index(name) -> int:
    try:
        return int(name.split("-")[1].split(".")[0])
    except (IndexError, ValueError):
        return -1


class _FolderLock:
    """An output folder's ``.lock``, so that two runs never write one folder at once. Held with ``fcntl.flock``: the
    system releases it when its process ends, however it ends (a killed run never blocks the next one, and no pid
    can be mistaken for another). The file names the holder (pid, host) for the refusal message. Without ``fcntl``
    (Windows) the file's existence is the lock, and a holder on this host that is gone is taken over."""

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"
        self.fd = None

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            holder = {}
        return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"

    def __enter__(self):
        import socket

        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        try:
            import fcntl
        except ImportError:
            fcntl = None
        for _ in range(5):
            if fcntl is None:
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    try:
                        holder = json.loads(self.path.read_text() or "{}")
                    except (OSError, json.JSONDecodeError):
                        holder = {}
                    if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                        self.path.unlink(missing_ok=True)
                        continue
                    raise ValueError(self._busy()) from None
            else:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    raise ValueError(self._busy()) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the holder removed the file between our open and our lock: lock the new one
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
            os.write(fd, me.encode())
            self.fd = fd
            return self
        raise ValueError(f"cannot take the lock {self.path}")

    def _busy(self) -> str:
        return (f"{self.path.parent} is being written by another run ({self._holder()}); wait for it to end (its "
                f"lock, {self.path}, goes with it)")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)  # unlinked first: a run waiting on this file retries on a fresh one
            self.fd = None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write_text(path, text):
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {e.strerror or e}") from e


def _short(x, n=80):
    r = repr(x)
    return r if len(r) <= n else r[: n - 3] + "..."


def pack(ids, starts):
    """Concatenate token arrays into packed features (see :meth:`LLM2Vec.tokenize`); ``cu_seqlens_host`` and
    ``pool_start_host`` keep numpy copies of ``cu_seqlens`` and ``pool_start`` that stay on the host when the tensors
    move to the device."""
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    cu = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    flat = np.concatenate(ids) if len(ids) else np.zeros(0, np.int32)
    pos = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths)
    return {
        "input_ids": torch.from_numpy(flat.astype(np.int64)),
        "position_ids": torch.from_numpy(pos.astype(np.int64)),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": int(lengths.max()) if len(lengths) else 0,
        "pool_start": torch.from_numpy(np.asarray(starts, dtype=np.int32)),
        "cu_seqlens_host": cu,
        "pool_start_host": np.array(starts, dtype=np.int32),  # a copy: the tensor above shares its memory
    }


# CPU BLAS takes another kernel for matrices of fewer rows (seen with MKL: fewer than 15), which rounds differently;
# a tiny batch gets a filler sequence so that a text's embedding never depends on its batch (batch invariance)
_MIN_CPU_TOKENS = 16
# texts tokenized per chunk, growing from the first to the largest (see LLM2Vec._packed_batches); the length sort is
# per chunk, which costs nothing with packed batches
_FIRST_CHUNK = 64
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# encode tokenizes through a fast tokenizer's Rust backend directly (LLM2Vec._tokenize_batch); False: through
# tokenizer.__call__ (the same tokens, slower)
FAST_TOKENIZE = True
_TOKENIZE_CHUNK = 32768
# while chunks grow, one that fills no whole batch runs at once (False: it waits for the next chunk's texts, the rule
# before 2026-11-27, under which wiki1m's 1.3B encode started after ~3,800 texts; bench_host_pipeline.py compares)
_EARLY_PARTIAL = True


def _unchanged(text):
    return text


def _add_filler(f, n):
    """Append a throw-away sequence of ``n`` tokens to packed features (its pooled row is dropped)."""
    dev = f["input_ids"].device
    total = f["input_ids"].numel()
    out = {
        "input_ids": torch.cat([f["input_ids"], f["input_ids"].new_zeros(n)]),
        "position_ids": torch.cat([f["position_ids"], torch.arange(n, device=dev)]),
        "cu_seqlens": torch.cat([f["cu_seqlens"], f["cu_seqlens"].new_tensor([total + n])]),
        "max_seqlen": max(int(f["max_seqlen"]), n),
        "pool_start": torch.cat([f["pool_start"], f["pool_start"].new_zeros(1)]),
    }
    if f.get("cu_seqlens_host") is not None:
        out["cu_seqlens_host"] = np.append(f["cu_seqlens_host"], total + n)
    if f.get("pool_start_host") is not None:
        out["pool_start_host"] = np.append(f["pool_start_host"], np.int32(0))
    return out


def default_batch_tokens(config, device, max_length=512, free_bytes=None, dtype=torch.bfloat16):
    """Default token budget of a packed encode batch on ``device``.

    CPU: ``32 × max_length`` (the original's batch of 32 at full length). CUDA: as many tokens as half of the free
    memory (the device's, plus what PyTorch's allocator holds cached and unused) holds at a forward pass's live
    activations per token (residual stream, q/k/v/o and the MLP's gate, up and activation, doubled for allocator
    and kernel workspace), capped at 65,536 (where a packed batch already fills an H100) and never below
    ``max_length`` (one full-length text must fit).
    """
    if torch.device(device).type != "cuda":
        return 32 * max_length
    if free_bytes is None:
        dev = torch.device(device)
        # what the device has free, plus what PyTorch's caching allocator holds but does not use (the last batch's
        # freed activations): the budget stays the same from one call to the next in one process
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        free_bytes = torch.cuda.mem_get_info(dev)[0] + cached
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * h
    per_token = 2 * torch.finfo(dtype).bits // 8 * (6 * h + 3 * inter)
    budget = int(free_bytes // 2 // per_token) // 1024 * 1024
    return max(min(budget, 65536), max_length)


def _budget_batches(sorted_lengths, budget):
    """Split length-sorted sequences into consecutive batches of at most ``budget`` tokens (one over-long
    sequence forms a batch alone). One search per batch, not a Python step per sequence."""
    lengths = np.asarray(sorted_lengths, dtype=np.int64)
    ends = np.concatenate([[0], np.cumsum(lengths)])  # ends[j]: tokens of sequences [0, j)
    batches, start, n = [], 0, len(lengths)
    while start < n:
        # the first j whose prefix overshoots: sequences [start, j - 1) fit, at least one per batch
        stop = int(np.searchsorted(ends, ends[start] + budget, side="right")) - 1
        stop = max(stop, start + 1)
        batches.append(range(start, stop))
        start = stop
    return batches


def _ahead(items, depth=1):
    """Iterate ``items`` (a generator doing host work) on a background thread, up to ``depth`` items ahead of the
    consumer. An exception in the thread is raised in the consumer; closing the consumer stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # surfaced in the consumer, never swallowed
            q.put(e)
        q.put(done)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.01)


def pool(hidden, cu_seqlens, pooling_mode, pool_start):
    """Pool packed hidden states with the original's modes (the Triton op on CUDA, its twin elsewhere)."""
    mode = _POOL_OP_MODE[pooling_mode]
    if hidden.is_cuda and os.environ.get("LLM2VEC_FAST_DISABLE_TRITON") != "1":
        from llm2vec_fast.kernels import masked_pool

        return masked_pool(hidden, cu_seqlens, mode, pool_start)
    from llm2vec_fast.kernels.reference import masked_pool_ref

    return masked_pool_ref(hidden, cu_seqlens, mode, pool_start)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_adapter_only(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def _is_release_without_weights(path) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / "adapter_config.json").is_file() and (p / "config.json").is_file()):
        return False
    own = [f for f in p.iterdir() if f.name.endswith((".safetensors", ".bin", ".safetensors.index.json",
                                                       ".bin.index.json")) and not f.name.startswith("adapter_")]
    return not own


def _adapter_base(folder) -> str:
    """The base model an adapter folder was trained on: our training record's ``load_with``, else peft's
    ``base_model_name_or_path``; errors say what to pass instead."""
    folder = Path(folder)
    record = {}
    if (folder / "llm2vec_training.json").is_file():
        record = json.loads((folder / "llm2vec_training.json").read_text()).get("load_with") or {}
    base = record.get("base_model_name_or_path")
    if base is None:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder} holds an adapter without a recorded base model: pass base_model_name_or_path "
                         "and this folder as peft_model_name_or_path")
    if not Path(base).exists() and base.count("/") != 1:
        raise FileNotFoundError(f"{folder} is an adapter trained on {base!r}, which is not here: pass the base "
                                "model as base_model_name_or_path and this folder as peft_model_name_or_path")
    return base


def _recorded_premerge(adapter_folder, base_path) -> str | None:
    """The adapter a training run merged into its base before training this one (``train simcse --peft``), when
    this adapter is applied on that same base: it must be merged first here too. None otherwise (another base, say
    one where it is already merged, is taken as given)."""
    record_path = Path(adapter_folder) / "llm2vec_training.json"
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text()).get("load_with") or {}
    merged, base = record.get("merged_adapter"), record.get("base_model_name_or_path")
    if not merged or base is None:
        return None
    base = resolve_model(base) if Path(base).exists() or base.count("/") == 1 else base
    if (Path(base).resolve() != Path(base_path).resolve()) if Path(base_path).exists() else base != base_path:
        return None
    if not Path(merged).exists():
        raise FileNotFoundError(f"{adapter_folder} was trained on {base} with the adapter {merged!r} merged into it, "
                                "and that adapter is not there any more: pass a base with it merged as "
                                "base_model_name_or_path")
    return merged


def write_encoder_config(folder, cfg: dict) -> None:
    """Write an encoder's settings: the original's keys into ``llm2vec_config.json`` (which the original llm2vec
    reads too), the others (``bidirectional``, ``prompts``, ``template_name``) into ``llm2vec_fast_config.json``."""
    folder = Path(folder)
    (folder / CONFIG_NAME).write_text(json.dumps({k: v for k, v in cfg.items() if k in _ENCODER_KEYS}, indent=4))
    extra = {k: v for k, v in cfg.items() if k not in _ENCODER_KEYS}
    if extra:
        (folder / EXTRA_CONFIG_NAME).write_text(json.dumps(extra, indent=4))
    else:
        (folder / EXTRA_CONFIG_NAME).unlink(missing_ok=True)


def _read_config(folder):
    """A folder's encoder settings: ``llm2vec_config.json`` (with any extra keys earlier versions wrote there) and
    ``llm2vec_fast_config.json``; {} when it has neither."""
    if folder is None:
        return {}
    files = [Path(folder) / name for name in (CONFIG_NAME, EXTRA_CONFIG_NAME) if (Path(folder) / name).exists()]
    # a key in both files (an earlier version re-saved the folder into llm2vec_config.json alone): the newer wins
    files.sort(key=lambda f: f.stat().st_mtime)
    cfg = {}
    for p in files:
        try:
            cfg.update(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from e
    return cfg


@contextlib.contextmanager
def _lm_head_expected(config):
    """While loading the base model of a ``*ForCausalLM`` checkpoint (every decoder LLM's), its LM head is an expected
    leftover: the encoder never uses it. Transformers would otherwise print a load report flagging it as
    UNEXPECTED on every load; other unexpected or missing keys are still reported."""
    from transformers import AutoModel

    try:
        cls = AutoModel._model_mapping[type(config)]
    except (KeyError, AttributeError):
        yield
        return
    before = cls.__dict__.get("_keys_to_ignore_on_load_unexpected", _UNSET)
    inherited = getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []
    cls._keys_to_ignore_on_load_unexpected = [*inherited, r"^lm_head\."]
    try:
        yield
    finally:
        if before is _UNSET:
            del cls._keys_to_ignore_on_load_unexpected
        else:
            cls._keys_to_ignore_on_load_unexpected = before


_UNSET = object()


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _is_weight_file(name: str) -> bool:
    return name in _WEIGHT_FILES or (name.startswith(("model-", "pytorch_model-"))
                                     and name.endswith((".safetensors", ".bin")))


def _move_into(src: Path, out: Path) -> None:
    """Rename every file of ``src`` into ``out`` (same file system): a name already there, hard link or not, now
    points at the new file. When ``src`` holds model weights, weight files of ``out`` it does not hold (an older
    save's shards) are removed, as ``save_pretrained`` cleans its folder."""
    names = {p.name for p in src.iterdir()}
    if any(_is_weight_file(n) for n in names):
        for old in out.iterdir():
            if old.is_file() and _is_weight_file(old.name) and old.name not in names:
                old.unlink()
            # an adapter beside full weights is merged on load: the weights saved already hold any merged one
            elif old.is_file() and old.name in _ADAPTER_FILES and not names & set(_ADAPTER_FILES):
                old.unlink()
    for p in src.iterdir():
        dst = out / p.name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(p, dst)


def _check_device(device) -> torch.device:
    """``device`` as a ``torch.device``; a CUDA device this machine lacks is a ValueError that says so."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{device!r} is not a device (expected cpu, cuda, cuda:N, ...): {e}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            built = "has no usable GPU" if torch.backends.cuda.is_built() else "is a build without CUDA"
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available (torch {torch.__version__} "
                             f"{built}); use device='cpu'")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {str(device)!r} asked for, but this machine has {n} CUDA device(s): "
                             f"cuda:0..cuda:{n - 1}")
    return dev


def _parse_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": None}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(names)} or a torch.dtype")
    return names[dtype]


def _read_adapter_weights(folder) -> dict | None:
    """The tensors of a local adapter folder (``adapter_model.safetensors`` or ``.bin``); None for a hub id."""
    folder = Path(folder)
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "adapter_model.safetensors"))
    if (folder / "adapter_model.bin").is_file():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    return None


# an adapter trained on a *ForCausalLM names the decoder's modules one "model." deeper than the base model does
_CAUSAL_LM_PREFIX, _BASE_PREFIX = "base_model.model.model.", "base_model.model."


def _load_peft(model, adapter):
    """``PeftModel.from_pretrained(model, adapter)``, checked: every LoRA weight of the adapter must land on a module
    of ``model``. An adapter saved from a ``*ForCausalLM`` (keys ``base_model.model.model.layers...``) is remapped
    onto the base model this encoder holds; its ``lm_head`` weights, if any, are left out (an encoder has no LM
    head). Anything else that matches no module is a ValueError, instead of peft's warning and an adapter that is
    silently not applied."""
    import warnings

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    saved = _read_adapter_weights(adapter)
    with warnings.catch_warnings():
        if saved is not None:  # checked below, with a message that says what to do
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
        peft_model = PeftModel.from_pretrained(model, adapter)
    if saved is None:
        return peft_model
    expected = set(get_peft_model_state_dict(peft_model))
    if set(saved) == expected:
        return peft_model
    remapped = dict(saved)
    if not set(saved) & expected and any(k.startswith(_CAUSAL_LM_PREFIX) for k in saved):
        remapped = {(_BASE_PREFIX + k[len(_CAUSAL_LM_PREFIX):] if k.startswith(_CAUSAL_LM_PREFIX) else k): v
                    for k, v in saved.items()}
        head = [k for k in remapped if k.startswith(_BASE_PREFIX + "lm_head.")]
        if head:
            logger.info("%s: left out the adapter's %d lm_head weights (an encoder has no LM head)", adapter,
                        len(head))
            remapped = {k: v for k, v in remapped.items() if k not in head}
        logger.info("%s was saved from a causal-LM model: its weights are mapped onto the base model", adapter)
    unmatched, missing = sorted(set(remapped) - expected), sorted(expected - set(remapped))
    if unmatched or missing:
        raise ValueError(f"adapter {str(adapter)!r} does not fit this {type(model).__name__}: "
                         + (f"{len(unmatched)} of its weights match no module (e.g. {unmatched[0]!r}); "
                            if unmatched else "")
                         + (f"{len(missing)} LoRA weights of the model are not in it (e.g. {missing[0]!r}); "
                            if missing else "")
                         + f"expected keys like {sorted(expected)[0]!r}")
    if remapped is not saved:
        set_peft_model_state_dict(peft_model, remapped)
    return peft_model


def _document_text(doc, index) -> str:
    """A BEIR-style document's text, ``title + " " + text``; a string passes as it is; anything else is refused."""
    if isinstance(doc, str):
        return doc
    if not isinstance(doc, dict):
        raise TypeError(f"corpus[{index}] must be a string or a {{'title', 'text'}} dict, got {type(doc).__name__}")
    if "text" not in doc and "title" not in doc:
        raise ValueError(f"corpus[{index}] has neither 'text' nor 'title' (keys: {sorted(doc)[:8]}); expected a "
                         "BEIR-style document {'title': ..., 'text': ...}")
    parts = [doc.get("title"), doc.get("text")]
    bad = [p for p in parts if p is not None and not isinstance(p, str)]
    if bad:
        raise TypeError(f"corpus[{index}]: 'title' and 'text' must be strings, got {type(bad[0]).__name__}")
    return " ".join(p for p in parts if p).strip()


def _weights_fingerprint(model) -> str:
    """A cheap fingerprint of a model's weights: every parameter's name, shape, dtype and first and last 64 values.
    A retrained or re-merged model saved under the same path gets another one (LoRA merging changes every element
    of a weight it touches), without reading all the weights."""
    import hashlib

    h = hashlib.sha1()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            flat = prm.detach().reshape(-1)
            sample = torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy()
            h.update(f"{name}:{tuple(prm.shape)}:{prm.dtype}".encode())
            h.update(sample.tobytes())
    return h.hexdigest()[:16]


def _merge_embedded_adapter(model, path):
    """A base folder carrying a LoRA adapter (the original MNTP releases): merge it into the weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not getattr(model, "_hf_peft_config_loaded", False):
        model.load_adapter(path)
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    model._hf_peft_config_loaded = False
    if hasattr(model, "peft_config"):
        del model.peft_config
    # transformers 5 loads an adapter through key renamings (the checkpoint's "base_model.model." prefix and its
    # lora_ names) kept on the model, and save_pretrained applies them in reverse: the merged weights would be saved
    # as "base_model.model.layers..." keys that no model loads. They belong to the adapter, now gone.
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if not any(
            "base_model.model." in p or "lora_" in p for p in getattr(c, "source_patterns", ()) or ())]
    return model
