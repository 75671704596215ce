"""Copy the table of results/README-TABLE.md (written by `meprop reproduce --table readme`) into the
project README, under its `<!-- readme-table: ... -->` marker. A test checks that the two agree.

Usage: python scripts/sync_readme_table.py
"""

from __future__ import annotations

from pathlib import Path

MARKER = "<!-- readme-table: from results/README-TABLE.md -->\n"


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    table = [line for line in (root / "results" / "README-TABLE.md").read_text(encoding="utf-8").splitlines()
             if line.startswith("|")]
    readme = root / "README.md"
    before, after = readme.read_text(encoding="utf-8").split(MARKER, 1)
    rest = after.split("\n\n", 1)[1]  # what follows the old table's blank line
    readme.write_text(before + MARKER + "\n".join(table) + "\n\n" + rest, encoding="utf-8")
    print(f"README.md: {len(table) - 2} table rows copied from results/README-TABLE.md")


if __name__ == "__main__":
    main()
