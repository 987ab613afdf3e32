"""Rewrite the README's generated parts: python scripts/update_readme.py

The finding catalogue is generated from the rule table (src/lossdoctor/diagnose/findings.py);
tests/test_architecture.py fails when the README's copy differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lossdoctor.report.explain import CATALOGUE_BEGIN, CATALOGUE_END, catalogue_markdown  # noqa: E402


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(CATALOGUE_BEGIN), text.index(CATALOGUE_END) + len(CATALOGUE_END)
    readme.write_text(text[:start] + catalogue_markdown() + text[end:], encoding="utf-8")
    print("README.md: finding catalogue regenerated")


if __name__ == "__main__":
    main()
