"""The README's "Test your own preconditioner" section, run verbatim."""

import pathlib
import re
import tomllib

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
PYPROJECT = README.parent / "pyproject.toml"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Test your own preconditioner")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_install_line_names_the_testing_extra():
    bash = re.search(r"```bash\n(.*?)```", _section(), re.S).group(1)
    extra = re.search(r'pip install -e "\.\[(\w+)\]"', bash).group(1)
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("hypothesis") for dep in extras[extra])


def test_readme_snippet_runs_verbatim():
    code = re.search(r"```python\n(.*?)```", _section(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 17
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:  # as pytest would call them (the @given one runs its examples)
        test()
