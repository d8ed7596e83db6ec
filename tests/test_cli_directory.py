"""``medsecure directory …`` and ``medsecure trust …`` as real subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fhir_server import AnnuaireServer, sample_data
from test_cli_core import one_error_line, run


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dir")
    for name in ("authority", "bob", "other"):
        assert run(["keygen", "-o", f"{name}.key"], d).returncode == 0
        assert run(["pubkey", f"{name}.key", "-o", f"{name}.pub"], d).returncode == 0
    return d


def test_trust_sign_verify_and_directory_add(work: Path) -> None:
    proc = run(
        [
            "trust",
            "sign",
            "--authority",
            "authority.key",
            "--idnps",
            "rpps:10000005479",
            "--key",
            "bob.pub",
            "--days",
            "30",
            "-o",
            "bob.binding",
        ],
        work,
    )
    assert proc.returncode == 0, proc.stderr
    proc = run(["trust", "verify", "bob.binding", "--authority", "authority.pub"], work)
    assert (
        proc.returncode == 0
        and "type: binding" in proc.stdout
        and "practitioner: 810000005479" in proc.stdout
    )
    assert "issuer is not an accepted authority" in one_error_line(
        run(["trust", "verify", "bob.binding", "--authority", "other.pub"], work)
    )
    text = (work / "bob.binding").read_text().strip()
    forged = text[:30] + ("A" if text[30] != "A" else "B") + text[31:]
    one_error_line(run(["trust", "verify", forged], work))

    proc = run(
        [
            "directory",
            "add",
            "--directory",
            "practice.json",
            "--idnps",
            "rpps:10000005479",
            "--family",
            "MARTIN",
            "--given",
            "Sophie",
            "--mailbox",
            "sophie.martin@medecin.mssante.fr",
            "--key",
            "bob.pub",
            "--statement",
            "bob.binding",
            "--drop",
            "inbox/sophie",
        ],
        work,
    )
    assert proc.returncode == 0, proc.stderr
    proc = run(
        [
            "directory",
            "lookup",
            "sophie.martin@medecin.mssante.fr",
            "--directory",
            "practice.json",
            "--json",
        ],
        work,
    )
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads(proc.stdout)
    assert entry["idnps"] == "810000005479" and len(entry["keys"][0]["statements"]) == 1
    assert entry["endpoints"][0]["kind"] == "drop"
    proc = run(["directory", "lookup", "rpps:10000005479", "--directory", "practice.json"], work)
    assert "Sophie MARTIN" in proc.stdout and "key: ms1" in proc.stdout

    assert (
        run(
            [
                "trust",
                "revoke",
                "--issuer",
                "authority.key",
                "--idnps",
                "810000005479",
                "--key",
                "bob.pub",
                "--reason",
                "keyCompromise",
                "-o",
                "bob.revoked",
            ],
            work,
        ).returncode
        == 0
    )
    assert "type: revocation" in run(["trust", "verify", "bob.revoked"], work).stdout
    assert (
        run(
            [
                "trust",
                "rotate",
                "--old",
                "bob.key",
                "--idnps",
                "810000005479",
                "--new",
                "other.pub",
                "-o",
                "rot",
            ],
            work,
        ).returncode
        == 0
    )
    assert "new key: ms1" in run(["trust", "verify", "rot"], work).stdout


def test_import_export(work: Path, tmp_path: Path) -> None:
    bundle = {"resourceType": "Bundle", "entry": [{"resource": r} for r in sample_data()]}
    src = tmp_path / "annuaire-export.json"
    src.write_text(json.dumps(bundle))
    target = tmp_path / "local.json"
    proc = run(["directory", "import", "--directory", str(target), str(src)], work)
    assert proc.returncode == 0, proc.stderr
    proc = run(
        ["directory", "search", "--name", "dupont", "--directory", str(target), "--json"], work
    )
    assert [p["given_name"] for p in json.loads(proc.stdout)] == ["Jean", "Marie"]
    out = tmp_path / "copy.cbor"
    assert (
        run(["directory", "export", "--directory", str(target), "-o", str(out)], work).returncode
        == 0
    )
    proc = run(["directory", "lookup", "adeli:751004587", "--directory", str(out)], work)
    assert "DURAND" in proc.stdout
    proc = run(["directory", "export", "--directory", str(target)], work)
    assert len(json.loads(proc.stdout)) == 5


def test_fhir_lookup_from_the_cli(work: Path) -> None:
    with AnnuaireServer() as srv:
        proc = run(
            [
                "directory",
                "lookup",
                "rpps:10000005479",
                "--fhir",
                srv.base_url,
                "--api-key",
                "test-key",
            ],
            work,
        )
        assert proc.returncode == 0, proc.stderr
        assert (
            "Sophie MARTIN" in proc.stdout and "cardio.martin@chu-nancy.mssante.fr" in proc.stdout
        )
        assert "HTTP 401" in one_error_line(
            run(["directory", "lookup", "rpps:10000005479", "--fhir", srv.base_url], work)
        )
        proc = run(
            [
                "directory",
                "search",
                "--name",
                "martin",
                "--fhir",
                srv.base_url,
                "--api-key",
                "test-key",
            ],
            work,
        )
        assert "1 practitioner(s)" in proc.stderr


@pytest.mark.parametrize(
    "url", ["https://\u2026/fhir/v2", "https://a_b..c/fhir", "https://example.fr:abc/fhir"]
)
def test_fhir_url_that_cannot_be_used(work: Path, url: str) -> None:
    for argv in (
        ["directory", "lookup", "rpps:10000005479", "--fhir", url],
        ["directory", "search", "--name", "martin", "--fhir", url],
    ):
        line = one_error_line(run(argv, work))
        assert "unexpected" not in line and "FHIR base URL" in line, line


def test_directory_cli_errors(work: Path) -> None:
    assert "exactly one of" in one_error_line(
        run(["directory", "lookup", "rpps:10000005479"], work)
    )
    assert "11 digits" in one_error_line(
        run(["directory", "lookup", "rpps:1", "--directory", "practice.json"], work)
    )
    assert "no practitioner matches" in one_error_line(
        run(["directory", "lookup", "rpps:10000000017", "--directory", "practice.json"], work)
    )
    (work / "broken.json").write_text("{oops")
    assert "not valid JSON" in one_error_line(
        run(["directory", "lookup", "rpps:10000005479", "--directory", "broken.json"], work)
    )
    assert "invalid entry" in one_error_line(
        run(
            [
                "directory",
                "add",
                "--directory",
                "x.json",
                "--idnps",
                "rpps:10000005479",
                "--mailbox",
                "x@gmail.com",
            ],
            work,
        )
    )
    assert "at least one" in one_error_line(
        run(["directory", "search", "--directory", "practice.json"], work)
    )


def _entry(work: Path, directory: str, ref: str) -> dict[str, object]:
    proc = run(["directory", "lookup", ref, "--directory", directory, "--json"], work)
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads(proc.stdout)
    return entry  # type: ignore[no-any-return]


def test_directory_add_keeps_one_entry_per_key_and_every_statement(work: Path) -> None:
    add = ["directory", "add", "--directory", "keys.json", "--idnps", "rpps:10000000017"]
    assert run([*add, "--family", "PETIT", "--key", "bob.pub"], work).returncode == 0
    # the same key again: still one key entry
    assert run([*add, "--key", "bob.pub"], work).returncode == 0
    assert run([*add, "--key", "bob.key"], work).returncode == 0  # via bob.key.pub beside it
    entry = _entry(work, "keys.json", "rpps:10000000017")
    assert len(entry["keys"]) == 1  # type: ignore[arg-type]
    # a revocation for the key already there, given alone: attached to it, never dropped
    assert (
        run(
            [
                "trust",
                "revoke",
                "--issuer",
                "bob.key",
                "--idnps",
                "rpps:10000000017",
                "--key",
                "bob.pub",
                "--reason",
                "keyCompromise",
                "-o",
                "bob.revocation",
            ],
            work,
        ).returncode
        == 0
    )
    proc = run([*add, "--statement", "bob.revocation"], work)
    assert proc.returncode == 0, proc.stderr
    (key,) = _entry(work, "keys.json", "rpps:10000000017")["keys"]  # type: ignore[misc]
    assert len(key["statements"]) == 1
    assert "1 statement(s)" in proc.stderr
    # adding it again, with its key, changes nothing
    assert run([*add, "--statement", "bob.revocation", "--key", "bob.pub"], work).returncode == 0
    (key,) = _entry(work, "keys.json", "rpps:10000000017")["keys"]  # type: ignore[misc]
    assert len(key["statements"]) == 1
    # a key already listed, re-added with a statement: still one key entry, with the statement
    other = ["directory", "add", "--directory", "other.json", "--idnps", "rpps:10000000017"]
    assert run([*other, "--key", "bob.pub"], work).returncode == 0
    assert run([*other, "--key", "bob.pub", "--statement", "bob.revocation"], work).returncode == 0
    (key,) = _entry(work, "other.json", "rpps:10000000017")["keys"]  # type: ignore[misc]
    assert len(key["statements"]) == 1
    # a statement about a key the entry does not list, or about someone else: refused, loudly
    line = one_error_line(
        run(
            [
                "directory",
                "add",
                "--directory",
                "keys.json",
                "--idnps",
                "rpps:10000005479",
                "--statement",
                "bob.revocation",
            ],
            work,
        )
    )
    assert "--statement" in line and "810000000017" in line
    assert (
        run(
            [
                "trust",
                "revoke",
                "--issuer",
                "other.key",
                "--idnps",
                "rpps:10000000017",
                "--key",
                "other.pub",
                "-o",
                "other.revocation",
            ],
            work,
        ).returncode
        == 0
    )
    line = one_error_line(run([*add, "--statement", "other.revocation"], work))
    assert "--statement" in line and "does not list" in line


def test_directory_add_does_not_overwrite_a_broken_file(work: Path) -> None:
    (work / "damaged.json").write_text("{oops")
    line = one_error_line(
        run(
            [
                "directory",
                "add",
                "--directory",
                "damaged.json",
                "--idnps",
                "rpps:10000005479",
                "--key",
                "bob.pub",
            ],
            work,
        )
    )
    assert "not valid JSON" in line
    assert (work / "damaged.json").read_text() == "{oops"
