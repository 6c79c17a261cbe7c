"""The tiny model's tokenizer alone: what a gateway in front of simulated workers renders and
tokenizes with, built without torch and identical to the full model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from worker.vllm.tiny_model import build_tiny_tokenizer, resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def test_built_without_torch_with_its_chat_template(tmp_path):
    code = ("import sys; from worker.vllm.tiny_model import build_tiny_tokenizer; "
            f"p = build_tiny_tokenizer({str(tmp_path)!r}); "
            "print(p); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    folder, torch_loaded = Path(out[0]), out[1]
    assert torch_loaded == "False"
    assert folder.name.endswith("-tokenizer") and (folder / ".complete").exists()
    assert not list(folder.glob("*.safetensors"))  # no weights
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in config["chat_template"]


def test_its_files_are_the_full_models(tmp_path):
    alone = build_tiny_tokenizer(tmp_path)
    model = Path(resolve_model(None))  # the full model, built (or cached) in the default cache
    for name in TOKENIZER_FILES:
        assert (alone / name).read_bytes() == (model / name).read_bytes(), name


def test_the_full_model_is_used_when_it_is_built(tmp_path):
    model = Path(resolve_model(None))
    # In the cache that holds the full model, the model's own folder is the answer.
    assert build_tiny_tokenizer(model.parent) == model
