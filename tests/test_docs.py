"""Generated docs stay in step with what generates them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_compatibility_tables_are_generated_from_the_compatibility_tests_lists():
    """docs/compatibility.md is rendered from MODEL_FAMILIES and DATA_LAYOUTS: a family or layout added to a test
    and not to the docs (or the reverse) fails here."""
    check = subprocess.run([sys.executable, "scripts/compat_tables.py", "--check"], cwd=ROOT, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
