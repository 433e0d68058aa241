"""Which keyproviders modules may import what (issue 11, items 3 and 5).

- Only ``keyproviders/_crypto.py`` imports ``cryptography.hazmat``: one module holds every
  construction, and its known-answer vectors (test_keyprovider_vectors.py) pin them.
- Only the ``keyproviders/pkcs11/`` package imports python-pkcs11, so a file-provider install needs
  no native module and PKCS#11 exceptions are converted at that one boundary.

The imports are read from the syntax tree, so a comment or a string naming a module does not count
and an import inside a function does.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "keyproviders"


def _imports(source: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _importers(prefix: str) -> set[str]:
    return {
        str(source.relative_to(ROOT))
        for source in ROOT.rglob("*.py")
        if any(name == prefix or name.startswith(prefix + ".") for name in _imports(source))
    }


def test_only_the_crypto_module_imports_cryptography_hazmat() -> None:
    assert _importers("cryptography.hazmat") == {"_crypto.py"}


def test_only_the_pkcs11_package_imports_python_pkcs11() -> None:
    importers = _importers("pkcs11")
    assert importers, "the pkcs11 package imports python-pkcs11"
    assert all(Path(path).parts[0] == "pkcs11" and len(Path(path).parts) == 2 for path in importers), importers


def test_keyproviders_never_imports_secretsd_in_any_module() -> None:
    assert _importers("secretsd") == set()
