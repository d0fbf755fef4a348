"""Where a ``--model`` value lives: a local directory, a built-in or dummy model, or a Hugging Face repo id.

Flow of :func:`resolve_model` (torch-free: the router uses it too):
1. ``builtin:...`` and ``dummy:...`` names, and existing directories, are returned unchanged.
2. A value shaped like a repo id (``owner/name``, optionally ``owner/name@revision``) is looked up in the local
   Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``). With ``HF_HUB_OFFLINE=1`` only the cache is used; otherwise
   the files a server needs (config, safetensors weights, tokenizer, chat template) are downloaded first, with
   huggingface_hub's progress bars. The snapshot directory is returned.
3. Anything else, or a repo id that cannot be found, raises :class:`ModelNotFound` with a message for the user.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
SERVER_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt")
"""What serving needs from a repo (no PyTorch .bin weights, no ONNX or GGUF copies)."""


class ModelNotFound(ValueError):
    """The ``--model`` value names nothing this machine has or can get."""


def is_local(model: str) -> bool:
    return model.startswith(("builtin:", "dummy:")) or os.path.isdir(model)


def is_repo_id(model: str) -> bool:
    """Shaped like ``owner/name[@revision]`` and not a directory here (a path that merely does not exist is not)."""
    return not is_local(model) and bool(REPO_ID.match(model)) and not model.startswith((".", "/"))


def resolve_model(model: str) -> str:
    """A directory (or a ``builtin:`` / ``dummy:`` name) for ``model``; see the module docstring."""
    if is_local(model):
        return model
    if not is_repo_id(model):
        raise ModelNotFound(f"--model {model}: no such model directory (or use builtin:tiny-random-llama, "
                            "dummy:<shape>, or a Hugging Face repo id such as owner/name)")
    repo, _, revision = model.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # a declared dependency; only a broken install gets here
        raise ModelNotFound(f"--model {model}: huggingface_hub is not installed ({exc})") from exc
    try:
        path = snapshot_download(repo, revision=revision or None, allow_patterns=list(SERVER_FILES),
                                 local_files_only=offline)
    except LocalEntryNotFoundError as exc:
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "locally or on the Hub"
        raise ModelNotFound(f"--model {model}: not found {where}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelNotFound(f"--model {model}: cannot get it from the Hugging Face Hub: {exc}") from exc
    logger.info("model %s resolved to %s", model, path)
    return path
