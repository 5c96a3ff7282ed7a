"""Fetching a model from the Hugging Face hub: only the files sbert-flax reads, one line per failure.

A hub repository often ships the same weights several times (PyTorch, safetensors, ONNX, OpenVINO,
TF); a full snapshot would download all of them. Here the repository's file list decides what to
fetch: `config.json`, one weights format (safetensors preferred, sharded or not), the tokenizer
files and the sentence-transformers metadata (`modules.json` and the config of each module folder
it names). The revision (a branch, a tag, or none for the default branch) is resolved to its
commit once, and every file is fetched at that commit: a push during the download cannot mix two
snapshots. The branch or tag is then recorded in the cache (`refs/`), as huggingface_hub does, so
that an offline load finds it. Offline, the cached snapshot is used as it is.

Each failure is a `ModelNotFoundError` (an OSError: the CLIs print it as one line and exit 2) whose
message says which of offline, authentication, not found or disk full it was, and what to do.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import PurePosixPath

# The model every command loads when none is named (its hub id).
DEFAULT_MODEL = "uer/sbert-base-chinese-nli"

# Files read from a model folder (the root, or a module folder that modules.json names).
MODEL_FILES = ("config.json", "sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json",
               "vocab.txt", "special_tokens_map.json")
ROOT_FILES = ("modules.json", "config_sentence_transformers.json")
# Preference order: the first one a folder ships is the only one fetched.
WEIGHT_CHOICES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")


class ModelNotFoundError(OSError):
    """Neither a local folder nor downloadable; the message says what to do."""


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _module_folders(modules_json: str) -> list[str]:
    """The folders modules.json names ("" for the root); a bad file is read_st_folder's to report."""
    try:
        with open(modules_json, encoding="utf-8") as f:
            modules = json.load(f)
        return [str(m.get("path", "")).strip("/") for m in modules if isinstance(m, dict)]
    except (OSError, ValueError):
        return []


def files_to_fetch(repo_files: list[str], folder: str) -> list[str]:
    """The files of `folder` (one weights format) that `repo_files` holds, index files first."""
    present = set(repo_files)
    wanted = [_join(folder, n) for n in MODEL_FILES if _join(folder, n) in present]
    for choice in WEIGHT_CHOICES:
        if _join(folder, choice) in present:
            wanted.append(_join(folder, choice))
            break
    return wanted


def _shards(index_file: str, folder: str) -> list[str]:
    """The shard files a `*.index.json` names, relative to the repository root."""
    with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map", {})
    return sorted({_join(folder, v) for v in weight_map.values()})


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Network failures; transport classes only from HTTP clients already imported (no new import)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx", "TransportError"), ("httpx2", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _status(e: BaseException) -> int | None:
    return getattr(getattr(e, "response", None), "status_code", None)


def explain(e: BaseException, repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    """A one-line message for a failed download, naming its class of failure and the fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = repo_id + (f"@{revision}" if revision else "")
    # Subclasses first: LocalEntryNotFoundError is an EntryNotFoundError, GatedRepoError a
    # RepositoryNotFoundError, and all the hub's classes are OSErrors.
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        cache = cache_dir or constants.HF_HUB_CACHE
        return (f"model {where!r}: no space left in {cache} while downloading it: free some "
                "space, or pass --cache-dir on a larger disk")
    if isinstance(e, GatedRepoError) or (isinstance(e, HfHubHTTPError) and _status(e) in (401, 403)
                                         and not isinstance(e, RevisionNotFoundError)):
        return (f"model {where!r} is gated or private and needs a token: --token or HF_TOKEN "
                "(with access granted on its hub page)")
    if isinstance(e, (LocalEntryNotFoundError, *_connection_errors())):
        return (f"model {where!r} is not in the cache and the Hugging Face hub cannot be reached "
                "(offline: pass a local directory, e.g. --model path/to/sbert-base-chinese-nli, "
                "or the --cache-dir it was downloaded to)")
    if isinstance(e, RevisionNotFoundError):
        return f"model {repo_id!r} has no revision {revision!r} on the Hugging Face hub (not found)"
    if isinstance(e, (RepositoryNotFoundError, HFValidationError)):
        return (f"model {repo_id!r} not found: no such local directory or Hugging Face hub "
                "repository (if it is private, pass --token or set HF_TOKEN)")
    if isinstance(e, EntryNotFoundError):
        return f"model {where!r}: a file it lists was not found on the Hugging Face hub ({e})".replace(
            "\n", " ")
    return f"model {where!r} could not be downloaded from the Hugging Face hub ({type(e).__name__}: {e})"


def download(repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
             cache_dir: str | None = None) -> str:
    """Fetches what sbert-flax reads of a hub model into the hub cache; returns its local folder.

    Args:
      repo_id: "owner/name" on the Hugging Face hub.
      revision: branch, tag or commit (default: the repository's default branch).
      token: access token for gated / private models; None lets huggingface_hub use HF_TOKEN or
        the saved login.
      cache_dir: the hub cache (default: huggingface_hub's, i.e. HF_HUB_CACHE / HF_HOME).

    Raises:
      ModelNotFoundError: offline and not cached, authentication, not found or disk full; the
        message says which.
    """
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        try:
            return _fetch(repo_id, revision, token, cache_dir)
        except (LocalEntryNotFoundError, *_connection_errors()):
            # Offline: whatever an earlier download left in the cache is the model.
            from huggingface_hub import snapshot_download

            return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                     token=token, local_files_only=True)
    except ModelNotFoundError:
        raise
    except Exception as e:
        if isinstance(e, (OSError, HfHubHTTPError, HFValidationError, *_connection_errors())):
            raise ModelNotFoundError(explain(e, repo_id, revision, cache_dir)) from None
        raise


def _record_ref(snapshot: str, revision: str | None, commit: str) -> None:
    """Points the cache's ref for `revision` at `commit` (huggingface_hub's cache layout:
    `<repo folder>/refs/<revision>` holds the commit of `<repo folder>/snapshots/<commit>`).

    Downloads by commit write no ref, and an offline load of the branch or tag reads it. Written
    once the whole snapshot is in, atomically; a cache laid out otherwise is left alone.
    """
    from huggingface_hub import constants

    name = revision or constants.DEFAULT_REVISION
    folder = os.path.dirname(os.path.dirname(snapshot))
    if name == commit or os.path.basename(snapshot) != commit \
            or os.path.basename(os.path.dirname(snapshot)) != "snapshots":
        return
    ref = os.path.join(folder, "refs", *name.split("/"))  # a branch may hold slashes
    try:
        with open(ref, encoding="utf-8") as f:
            if f.read().strip() == commit:
                return
    except OSError:
        pass
    try:
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        tmp = f"{ref}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(commit)
        os.replace(tmp, ref)
    except OSError:  # a read-only shared cache: the model is loaded all the same, only an
        pass  # offline load by this branch name would not find it


def _fetch(repo_id: str, revision: str | None, token: str | bool | None,
           cache_dir: str | None) -> str:
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    # The one commit every request below names: resolving the branch per file would mix the
    # snapshots before and after a push that lands mid-download.
    commit = api.model_info(repo_id, revision=revision, token=token).sha
    if not commit:
        raise ModelNotFoundError(f"model {repo_id!r}: the Hugging Face hub named no commit for "
                                 f"revision {revision or 'main'!r}; retry, or pass --revision "
                                 "with a commit hash")
    repo_files = api.list_repo_files(repo_id, revision=commit, token=token)
    if "config.json" not in repo_files and "modules.json" not in repo_files:
        raise ModelNotFoundError(f"model {repo_id!r} on the Hugging Face hub has no config.json: "
                                 "not a BERT / sentence-transformers model")

    def get(name: str) -> str:
        return hf_hub_download(repo_id, name, revision=commit, token=token, cache_dir=cache_dir)

    first = "modules.json" if "modules.json" in repo_files else "config.json"
    local = get(first)
    root = os.path.dirname(local)  # the snapshot folder: every file lands under it
    folders = [""]
    if first == "modules.json":
        folders += [f for f in _module_folders(local) if f]
    wanted = [n for n in ROOT_FILES if n in repo_files and n != first]
    for folder in dict.fromkeys(folders):
        wanted += files_to_fetch(repo_files, folder)
    for name in dict.fromkeys(n for n in wanted if n != first):
        path = get(name)
        if name.endswith(".index.json"):
            for shard in _shards(path, str(PurePosixPath(name).parent).strip(".")):
                get(shard)
    _record_ref(root, revision, commit)
    return root
