"""The README's configuration reference is generated from the schema and must not drift."""

import re

from compressor.config import reference_markdown

from .conftest import ROOT


def test_readme_config_reference_matches_schema():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", text, re.S)
    assert m, "README lacks the config reference markers"
    assert m.group(1) == reference_markdown(), "run: compress config-reference, paste into README"


def test_readme_set_up_commands_are_the_ci_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert "pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci


def test_readme_python_api_example_runs(tmp_path):
    import subprocess
    import sys

    text = (ROOT / "README.md").read_text()
    code = re.search(r"### Python API.*?```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('"configs/', f'"{ROOT}/configs/')
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "5,219 users" in p.stdout and "'ndcg@20'" in p.stdout
    assert (tmp_path / "runs" / "api-bundle" / "manifest.json").exists()
