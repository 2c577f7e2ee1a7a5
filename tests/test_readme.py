"""The README's set-up commands and CI agree."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shell_lines(text):
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    last = _shell_lines(ci)[-1]
    assert last.startswith("xvfb-run -a ")
    assert f"\n{last}\n" in readme


def test_readme_starts_with_install_and_test():
    readme = (ROOT / "README.md").read_text()
    head = readme[:1500]
    assert "pip install torch==2.13.0" in head
    assert 'pip install -e ".[testing]"' in head
    assert "xvfb-run -a python -m pytest" in head
