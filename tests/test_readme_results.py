"""The README's Results section is replaced from the results folder, and nothing else changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from sasa_patcher.cli import readme_results

README = "# title\n\nintro\n\n## Results\n<!-- results:start -->\nold numbers\n<!-- results:end -->\n\n## After\ntext\n"


def _results(folder: Path) -> Path:
    (folder / "evaluation").mkdir(parents=True)
    (folder / "evaluation" / "evaluation.md").write_text("| metric | base |\n| --- | --- |\n| ASR | 0.9 |\n")
    (folder / "bench.md").write_text("| runtime | prefill |\n| --- | --- |\n| pytorch | 1.4 |\n")
    (folder / "evaluation" / "evaluation.png").write_bytes(b"\x89PNG")
    return folder


def test_section_replaced_in_order_with_chart(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert readme_results.main([str(_results(tmp_path / "results")), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old numbers" not in text
    chart = text.index("](results/evaluation/evaluation.png)")
    assert text.index("| ASR | 0.9 |") < text.index("| pytorch | 1.4 |") < chart
    assert text.startswith("# title\n\nintro\n\n## Results\n<!-- results:start -->\n")
    assert text.endswith("<!-- results:end -->\n\n## After\ntext\n")
    assert not list(tmp_path.glob("*.tmp"))


def test_running_twice_gives_the_same_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    results = _results(tmp_path / "results")
    readme_results.main([str(results), "--readme", str(readme)])
    first = readme.read_text()
    readme_results.main([str(results), "--readme", str(readme)])
    assert readme.read_text() == first


@pytest.mark.parametrize("body", ["no markers here\n", "<!-- results:end -->\n<!-- results:start -->\n"])
def test_bad_markers_exit_2_and_leave_readme(tmp_path, body, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(body)
    assert readme_results.main([str(_results(tmp_path / "results")), "--readme", str(readme)]) == 2
    assert readme.read_text() == body
    assert "results:start" in capsys.readouterr().err


def test_missing_tables_exit_2(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    (tmp_path / "empty").mkdir()
    assert readme_results.main([str(tmp_path / "empty"), "--readme", str(readme)]) == 2
    assert "make results" in capsys.readouterr().err
    assert readme.read_text() == README
