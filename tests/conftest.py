import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
PLANTED = Path(__file__).resolve().parent / "planted.py"


@pytest.fixture
def in_repo(monkeypatch):
    """Run with the repository root as working directory (references are relative)."""
    monkeypatch.chdir(REPO)
    return REPO


def ref(path: Path, attr: str, label: str | None = None) -> str:
    text = f"{path}:{attr}"
    return f"{label}={text}" if label else text


# Keep pykeops' compile cache inside the user's cache dir, not the repo.
os.environ.setdefault("PYTHONHASHSEED", "0")
