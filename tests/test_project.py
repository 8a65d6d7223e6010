"""The target project: its root, and its line length read from its own formatter and linter settings."""

from pathlib import Path

import pytest

from mtp_migrate.project import line_length, project_root
from mtp_migrate.runner import migrate_file

FIXTURES = Path(__file__).parents[1] / "fixtures" / "codemod"


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("pyproject.toml", "[tool.ruff]\nline-length = 120\n", 120),
    ("pyproject.toml", "[tool.black]\nline-length = 100\n", 100),
    ("pyproject.toml", "[tool.ruff]\nline-length = 79\n[tool.black]\nline-length = 100\n", 79),
    ("pyproject.toml", "[project]\nname = 'x'\n", 88),
    ("pyproject.toml", "not toml = = =\n", 88),
    ("setup.cfg", "[flake8]\nmax-line-length = 99\n", 99),
    ("tox.ini", "[flake8]\nmax-line-length = 110\n", 110),
    ("tox.ini", "[flake8]\nmax-line-length = wide\n", 88),
])
def test_line_length_is_read_like_the_tools_read_it(tmp_path, name, text, expected):
    (tmp_path / ".git").mkdir()
    (tmp_path / name).write_text(text)
    (tmp_path / "src" / "pipelines").mkdir(parents=True)
    assert line_length(tmp_path / "src" / "pipelines") == expected


def test_the_search_stops_at_the_repository_root(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.ruff]\nline-length = 120\n")
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    assert line_length(tmp_path / "repo") == 88


def test_the_del_wraps_at_the_target_line_length(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / "pyproject.toml").write_text("[tool.ruff]\nline-length = 200\n")
    target = tmp_path / "run_rho1.py"
    target.write_bytes((FIXTURES / "rho1_long_del_wraps.in.py").read_bytes())
    wide = migrate_file(target, verify=False, cache=False).output.decode()
    assert "        del head_logits_for_offset, head_labels_for_offset," in wide
    assert "del (" in (FIXTURES / "rho1_long_del_wraps.out.py").read_text()


def test_the_project_root_is_the_nearest_folder_with_a_marker(tmp_path):
    (tmp_path / "repo" / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "repo" / "pyproject.toml").write_text("")
    assert project_root(tmp_path / "repo" / "src" / "pkg") == (tmp_path / "repo").resolve()
