"""The README's configuration reference is generated from the schema and must not drift."""

import re

from compressor.config import reference_markdown

from .conftest import ROOT


def test_readme_config_reference_matches_schema():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", text, re.S)
    assert m, "README lacks the config reference markers"
    assert m.group(1) == reference_markdown(), "run: python -m compressor.cli config-reference, paste into README"


def test_readme_set_up_commands_are_the_ci_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert "pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci
