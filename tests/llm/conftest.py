"""The LLM tests use the model zoo's cases (tests/zoo/zoo.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "zoo"))
