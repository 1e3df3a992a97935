"""The README names every config group option and states the commands CI runs."""

from __future__ import annotations

from conftest import CONF, REPO

README = (REPO / "README.md").read_text()


def test_readme_lists_every_group_option():
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment")):
        for option in sorted(p.stem for p in group.glob("*.yaml")):
            if group.name in ("data", "trainer") and (option.startswith("toy_") or option in
                                                      {p.stem for p in (CONF / "algo").glob("*.yaml")}):
                continue  # chosen with the algo: named in the README as toy_<algo> / <algo>
            assert f"`{option}`" in README, f"README does not mention {group.name}={option}"


def test_ci_runs_the_readme_commands():
    """CI runs the README's two test commands, and the Makefile runs the install and test commands the README
    gives for people who manage their own environment."""
    ci, makefile = (REPO / ".ci" / "run").read_text(), (REPO / "Makefile").read_text()
    for command in ("make test", "make test-slow"):
        assert command in README and command in ci, command
    for command in ("pip install torch==2.13.0", "pip install -r requirements.txt", "python -m pytest",
                    "python -m pytest -m slow"):
        assert command in README, command
    assert 'pip install "$(TORCH)"' in makefile and "TORCH ?= torch==2.13.0" in makefile
    assert "pip install -r requirements.txt" in makefile and "python -m pytest -m slow" in makefile
