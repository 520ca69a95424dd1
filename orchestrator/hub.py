"""A model's small files from the Hugging Face Hub: config.json (its architecture) and the
tokenizer files (to count a dataset's tokens exactly).

The hub cache comes first (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub,
read at each call so a changed environment counts): a file cached once is never fetched again,
and in the cache layout (models--Org--Name/refs/main -> snapshots/<revision>/) that
`huggingface_hub` writes. Only when a file is not cached, and `HF_HUB_OFFLINE` is not set, does
`hf_hub_download` fetch it, with `HF_TOKEN` for gated models. huggingface_hub (and its HTTP stack)
is imported only then, so planning a cached or built-in model stays fast.
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class HubAnswer:
    """A file's local path, or why there is none (for the one-line error a plan shows)."""

    path: Optional[Path]
    why: str = ""


def is_repo_id(name: str) -> bool:
    """'Org/Name' as the Hub spells repository ids (a local path that exists is not one)."""
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def _lookup(repo_id: str, filename: str):
    """try_to_load_from_cache's answer: a path, its 'known not to exist' marker, or None."""
    if not (hub_cache() / f"models--{repo_id.replace('/', '--')}").is_dir():
        return None  # nothing of this repo is cached: skip importing huggingface_hub at all
    from huggingface_hub import try_to_load_from_cache

    return try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache())


def cached(repo_id: str, filename: str) -> Optional[Path]:
    """The file from the hub cache at refs/main, without touching the network."""
    found = _lookup(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


def fetch(repo_id: str, filename: str) -> HubAnswer:
    """The file, from the cache or downloaded into it; a HubAnswer saying why not otherwise."""
    path = cached(repo_id, filename)
    if path is not None:
        return HubAnswer(path)
    if offline():
        return HubAnswer(None, f"not in the hub cache {hub_cache()} and HF_HUB_OFFLINE is set")
    return _download(repo_id, filename, str(hub_cache()))


@lru_cache(maxsize=64)
def _download(repo_id: str, filename: str, cache_dir: str) -> HubAnswer:
    """One attempt per file and process: a Hub that cannot be reached is not asked again per plan."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        # token=None: huggingface_hub reads HF_TOKEN (or a saved login) itself; it never reaches our logs.
        with _quiet():
            return HubAnswer(Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, etag_timeout=10)))
    except GatedRepoError:
        return HubAnswer(None, "a gated repository: accept its licence on huggingface.co and set HF_TOKEN")
    except RepositoryNotFoundError:
        return HubAnswer(None, "no such repository on the Hugging Face Hub (or it is private: set HF_TOKEN)")
    except (EntryNotFoundError, RevisionNotFoundError):
        return HubAnswer(None, f"the repository has no {filename}")
    except HfHubHTTPError as e:
        return HubAnswer(None, f"the Hub answered HTTP {getattr(e.response, 'status_code', '?')}")
    except Exception as e:  # no network, DNS, proxy, timeouts: the Hub cannot be reached
        return HubAnswer(None, f"the Hugging Face Hub cannot be reached ({type(e).__name__})")


@contextmanager
def _quiet():
    """No retry warnings or progress bars from huggingface_hub: a plan prints its own one line."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hub_log = logging.getLogger("huggingface_hub")
    level, bars_were_off = hub_log.level, are_progress_bars_disabled()
    hub_log.setLevel(logging.CRITICAL)
    disable_progress_bars()
    try:
        yield
    finally:
        hub_log.setLevel(level)
        if not bars_were_off:
            enable_progress_bars()


def tokenizer_dir(repo_id: str, download: bool = True) -> Optional[Path]:
    """The snapshot directory holding the model's tokenizer.json (and its config, when it has one)."""
    tokenizer = fetch(repo_id, "tokenizer.json").path if download else cached(repo_id, "tokenizer.json")
    if tokenizer is None:
        return None
    for name in TOKENIZER_FILES[1:]:
        # Optional files (a model without a chat template has none); a miss is remembered in the
        # cache, so it is asked for once, not at every plan.
        if download and _lookup(repo_id, name) is None:
            fetch(repo_id, name)
    return tokenizer.parent
