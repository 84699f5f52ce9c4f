"""Shared test setup: offline, deterministic, and the optional shared data located once."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
C4_SAMPLE = SHARED / "c4-sample" / "en"
SP_32K = SHARED / "tokenizers" / "sp-bpe-32k.model"


@pytest.fixture
def c4_sample():
    """The real C4 sample shards, or skip when this machine has none (a fresh clone elsewhere)."""
    if not C4_SAMPLE.is_dir():
        pytest.skip("../shared/c4-sample not present")
    return C4_SAMPLE


@pytest.fixture
def sp_32k():
    if not SP_32K.is_file():
        pytest.skip("../shared/tokenizers/sp-bpe-32k.model not present")
    return SP_32K
