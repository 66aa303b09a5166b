"""The repository's promises: CI runs exactly the README's test command."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [line.strip() for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S) for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    test_commands = [c for c in _commands(readme) if "pytest" in c]
    assert len(test_commands) == 1, test_commands
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert test_commands[0] in ci_lines
