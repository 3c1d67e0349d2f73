"""The README and the --help texts agree with the code."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dualgpu_alexnet.config import Config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_lists_every_config_key_and_no_stale_one():
    keys = {f"{section}.{key}" for section, values in Config().to_dict().items()
            for key in values}
    listed = set(re.findall(r"^\| `([a-z]+\.[a-z0-9_]+)` \|", README, flags=re.M))
    assert keys == listed


def test_readme_starts_with_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert "mpirun -n 2 python -m launch.train" in blocks[0]
    assert 'pip install -e ".[dev]"' in blocks[0]
    assert blocks[1].strip() == "python -m pytest -q"
    assert blocks[1].strip() in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("module", ["train", "summary", "prepare", "make_demo_data", "evaluate",
                                    "predict", "bench", "bench_layers"])
def test_every_command_has_help_and_is_in_the_readme(module):
    proc = subprocess.run([sys.executable, "-m", f"launch.{module}", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert f"python -m launch.{module}" in proc.stdout
    assert f"python -m launch.{module}" in README
