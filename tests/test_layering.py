"""The envelope core stays at the bottom of the layers (shared/ARCHITECTURE.md), and every spec
label lives in one module.

These tests look at what is *loaded* and what is *imported*, never at how long anything takes.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import medsecure
from medsecure.envelope import _labels

PACKAGE = Path(medsecure.__file__).parent
ENVELOPE = PACKAGE / "envelope"
DOCS = PACKAGE.parent / "docs"

# What the envelope core may import: the standard library, the two libraries that do the
# cryptography and the CBOR, its own modules, and the three core modules beside it.
ALLOWED_THIRD_PARTY = {"cryptography", "cbor2"}
ALLOWED_MEDSECURE = {"medsecure._errors", "medsecure._fs", "medsecure._identity"}
# Never loaded by the core, not even lazily.
ABOVE = (
    "pydantic",
    "httpx",
    "click",
    "medsecure.models",
    "medsecure.identifiers",
    "medsecure._document",
    "medsecure.directory",
    "medsecure.transports",
    "medsecure.trust",
    "medsecure.audit",
    "medsecure._client",
    "medsecure._inbox",
    "medsecure._outbox",
    "medsecure._home",
    "medsecure._store",
    "medsecure.cli",
)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function, as absolute names."""
    package = "medsecure." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts[:-1])
    package = package.rstrip(".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
                if node.module is None:  # from . import x: x is a module
                    found.update(f"{module}.{alias.name}" for alias in node.names)
                else:
                    found.add(module)
            else:
                assert node.module is not None
                found.add(node.module)
    return found


def test_the_envelope_core_imports_nothing_above_it() -> None:
    """Checked on the source, so a lazy import inside a function (as ``_check_doc`` once did
    with the models) is caught too."""
    offending = {}
    for path in sorted(ENVELOPE.glob("*.py")):
        for module in _imports(path):
            top = module.split(".")[0]
            if top == "medsecure":
                ok = module.startswith("medsecure.envelope") or module in ALLOWED_MEDSECURE
            else:
                ok = top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY
            if not ok:
                offending.setdefault(path.name, []).append(module)
    assert offending == {}


def test_the_core_modules_beside_it_import_only_the_core() -> None:
    """``_identity`` and ``_keyfile`` sit in the core layer with the envelope."""
    for name in ("_identity.py", "_keyfile.py", "_errors.py", "_fs.py"):
        for module in _imports(PACKAGE / name):
            top = module.split(".")[0]
            if top == "medsecure":
                assert module.startswith("medsecure.envelope") or module in {
                    *ALLOWED_MEDSECURE,
                    "medsecure._keyfile",
                }, (name, module)
            else:
                assert top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY, (name, module)


_SEAL_AND_OPEN = r"""
import io, json, sys
import medsecure.envelope as envelope
from medsecure._identity import Identity
from medsecure.envelope import _message
import datetime as dt

alice, bob = Identity.generate(), Identity.generate()
sealed = envelope.seal(b"x" * 70000, sender=alice, recipients=[bob.public], chunk_size=1 << 14)
assert envelope.unseal(sealed, identity=bob).data == b"x" * 70000
out = io.BytesIO()
envelope.seal_stream(io.BytesIO(b"y" * 100), out, sender=alice, recipients=[bob.public])
envelope.unseal_stream(io.BytesIO(out.getvalue()), io.BytesIO(), identity=bob)

class Doc:
    def open(self):
        return io.BytesIO(b"hello")

now = dt.datetime.now(dt.UTC)
manifest = _message.Manifest(
    message_id=_message.new_message_id(now), created=now, sender_idnps="810000005479",
    recipients=("810000000017",), subject="s", body="b", in_reply_to=None,
    documents=({"id": "d", "media_type": "text/plain", "size": 5,
                "patient": {"ins": {"matricule": "x"}}, "document_type": {"code": "c"}},),
)
plain = _message.MessageReader(manifest, [Doc()]).read()
parsed, offset = _message.read_manifest(io.BytesIO(plain), len(plain))
assert parsed.message_id == manifest.message_id and plain[offset:] == b"hello"
print(json.dumps(sorted(sys.modules)))
"""


def test_sealing_opening_and_reading_a_manifest_load_nothing_above_the_core() -> None:
    """A real seal, unseal, streaming seal/unseal and manifest round trip in a fresh process:
    none of them loads pydantic, httpx, the models or any part above the core."""
    out = subprocess.run(
        [sys.executable, "-c", _SEAL_AND_OPEN], capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    above = [m for m in loaded if any(m == a or m.startswith(a + ".") for a in ABOVE)]
    assert above == []
    assert "medsecure.envelope._seal" in loaded


def test_the_envelope_package_exposes_the_envelope_functions() -> None:
    """The same objects as the top-level names (test_surface pins the list)."""
    import medsecure.envelope as envelope

    for name in envelope.__all__:
        assert getattr(envelope, name) is getattr(medsecure, name)


def _label_literals(path: Path) -> list[str]:
    """String and bytes literals that spell a label (``medsecure/v1/…``) or a magic out."""
    pattern = re.compile(r"medsecure/v1/[a-z0-9-]+|MEDSEC[A-Z]?\x00?[\x00-\x09]")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            if pattern.fullmatch(text):
                found.append(text)
    return found


def test_every_label_is_spelled_out_in_the_labels_module_only() -> None:
    spelled = {
        str(path.relative_to(PACKAGE)): _label_literals(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != ENVELOPE / "_labels.py"
    }
    assert {k: v for k, v in spelled.items() if v} == {}
    assert _label_literals(ENVELOPE / "_labels.py")  # the pattern does find them there


def test_every_label_is_quoted_verbatim_from_a_spec() -> None:
    specs = "\n".join(
        [
            (DOCS / "format.md").read_text(),
            (DOCS / "trust.md").read_text(),
            (DOCS / "relay.md").read_text(),
            ast.get_docstring(ast.parse((PACKAGE / "audit.py").read_text())) or "",
        ]
    )
    labels = {
        name: value
        for name, value in vars(_labels).items()
        if name.startswith("LABEL_") and isinstance(value, bytes)
    }
    assert len(labels) >= 10
    for name, value in labels.items():
        assert f'"{value.decode()}"' in specs or f"`{value.decode()}`" in specs, name
    for name in ("PUBLIC_TEXT_PREFIX", "FINGERPRINT_TEXT_PREFIX", "STATEMENT_TEXT_PREFIX"):
        assert f"`{getattr(_labels, name)}`" in specs or f'"{getattr(_labels, name)}"' in specs
    assert '"MEDSEC" 0x00 0x01' in specs and _labels.ENVELOPE_MAGIC == b"MEDSEC\x00\x01"
    assert '"MEDSECM" 0x01' in specs and _labels.MESSAGE_MAGIC == b"MEDSECM\x01"
    assert '"MEDSECK" 0x02' in specs and _labels.KEYFILE_MAGIC_V2 == b"MEDSECK\x02"
