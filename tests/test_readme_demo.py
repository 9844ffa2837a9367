"""The README's demo table is what `python -m arcface_kernels.demo` prints: same header, same
heads in the same order, numbers in the same format (checked against a fresh quick run; the
numbers themselves come from the full run on the machine the README names)."""

import os
import re

from arcface_kernels.demo.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shape(line):
    """A table line with every number replaced by a placeholder: its format, not its value."""
    return re.sub(r"\d+\.\d+", "<number>", line)


def test_readme_demo_table_has_the_format_the_demo_prints(tmp_path):
    main(["--quick", "--out", str(tmp_path)])
    printed = (tmp_path / "table.md").read_text().strip().splitlines()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Demo"):]
    section = section[:section.index("\n## ", 1)]
    readme_table = [line for line in section.splitlines() if line.startswith("|")]
    assert readme_table, "no table in the README's demo section"
    assert readme_table[:2] == printed[:2]  # header and alignment row, verbatim
    assert [_shape(line) for line in readme_table] == [_shape(line) for line in printed], (readme_table, printed)
    for line in readme_table[2:]:
        assert all(re.fullmatch(r"\d+\.\d{3}", cell.strip()) for cell in line.strip("|").split("|")[1:]), line
