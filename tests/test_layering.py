"""Who may import whom: data flows compressor -> export -> serving, and only the application touches all three.

Each package is imported in a fresh interpreter (so nothing else has loaded what it must not), with every one of
its modules, and the forbidden top-level modules must be absent from sys.modules afterwards.
"""

import json
import pkgutil
import subprocess
import sys

import pytest

from .conftest import ROOT

FORBIDDEN = {
    "compressor": {"click", "mlflow", "matplotlib", "export", "serving", "compress_app"},
    "export": {"click", "mlflow", "matplotlib", "compress_app"},
    "serving": {"torch", "compressor", "mlflow", "click", "matplotlib", "export", "compress_app"},
}


def _modules(package: str) -> list[str]:
    names = [package]
    for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_loads_none_of_what_it_must_not(package):
    modules = _modules(package)
    assert len(modules) > 3, modules
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    loaded = set(json.loads(p.stdout.strip().splitlines()[-1]))
    assert not loaded & FORBIDDEN[package], f"{package} loads {sorted(loaded & FORBIDDEN[package])}"


def test_no_library_module_imports_the_application():
    for package in ("compressor", "export", "serving"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "compress_app" not in text, f"{path.relative_to(ROOT)} refers to the application package"


def test_library_files_stay_small():
    for package in ("compressor", "export", "serving"):
        for path in (ROOT / package).rglob("*.py"):
            n = len(path.read_text().splitlines())
            assert n <= 460, f"{path.relative_to(ROOT)} has {n} lines; split it by what its parts are"
