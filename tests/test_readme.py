"""The README as a new user reads it: its first section is the two set-up commands, and its code runs as written."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_first_section_is_the_two_commands_and_ci_runs_the_test_one():
    text = _readme()
    first = text.split("\n## ")[1]
    commands = [line.split("#")[0].strip() for line in re.search(r"```bash\n(.*?)```", first, re.S).group(1)
                .splitlines() if line.split("#")[0].strip()]
    assert commands == ["make run", "make test"]
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = [line.strip() for line in f if not line.lstrip().startswith("#")]
    assert any(re.match(r"^make( .*)? test( |$)", line) for line in ci)


def test_pins_live_in_the_constraints_file():
    with open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8") as f:
        pins = {re.split(r"[=<>]", line)[0]: line.strip() for line in f if line.strip() and not line.startswith("#")}
    for name, pin in (("torch", "torch==2.13.0"), ("triton", "triton==3.6.0"), ("numpy", "numpy<2.4")):
        assert pins.get(name) == pin


@pytest.mark.parametrize("index", range(len(_python_blocks(_readme()))))
def test_readme_python_blocks_run_as_written(index):
    code = _python_blocks(_readme())[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
