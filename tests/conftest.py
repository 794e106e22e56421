"""Shared test setup: no network, wandb offline, one cache directory per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Corpus/tokenizer caches live in a per-session directory (never the user's ~/.cache)."""
    if "DISTILL_TEST_CACHE" in os.environ:  # reuse across sessions when debugging
        os.environ["DISTILL_CACHE"] = os.environ["DISTILL_TEST_CACHE"]
    else:
        os.environ["DISTILL_CACHE"] = str(tmp_path_factory.mktemp("distill-cache"))
