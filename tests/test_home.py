"""The home folder: configuration sections build transports of any kind; init is all or nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import medsecure as m
from medsecure._home import register_transport
from medsecure.transports import FileTransport, MockTransport


def make(tmp_path: Path, **kw: Any) -> Path:
    home = tmp_path / "home"
    m.init_home(home, passphrase="pw", me="rpps:10000005479", **kw)
    return home


def test_transports_section_builds_every_kind(tmp_path: Path) -> None:
    home = make(tmp_path)
    cfg = json.loads((home / "config.json").read_text())
    assert cfg["transports"] == [{"kind": "drop", "path": str((home / "mailbox").resolve())}]
    assert "mailbox" not in cfg
    # a kind of one's own, registered by the application
    built: list[dict[str, Any]] = []

    def pigeon(root: Path, section: dict[str, Any]) -> MockTransport:
        built.append(section)
        mock = MockTransport()
        mock.kinds = frozenset({"pigeon"})  # type: ignore[misc]
        return mock

    register_transport("pigeon", pigeon)
    cfg["transports"].append({"kind": "pigeon", "loft": "north"})
    (home / "config.json").write_text(json.dumps(cfg))
    with m.client_from_home(home, passphrase="pw") as client:
        assert [type(t) for t in client.transports] == [FileTransport, MockTransport]
    assert built == [{"kind": "pigeon", "loft": "north"}]


def test_first_release_mailbox_form_still_reads(tmp_path: Path) -> None:
    home = make(tmp_path)
    cfg = json.loads((home / "config.json").read_text())
    cfg["mailbox"] = cfg.pop("transports")[0]["path"]
    (home / "config.json").write_text(json.dumps(cfg))
    with m.client_from_home(home, passphrase="pw") as client:
        assert isinstance(client.transports[0], FileTransport)


@pytest.mark.parametrize(
    ("transports", "match"),
    [
        ([{"kind": "carrier-owl"}], "unknown transport kind"),
        ([{"path": "/x"}], "'kind'"),
        ([], "no 'transports'"),
        ([{"kind": "drop"}], "needs 'path'"),
    ],
)
def test_bad_transport_sections_are_config_errors(
    tmp_path: Path, transports: list[dict[str, Any]], match: str
) -> None:
    home = make(tmp_path)
    cfg = json.loads((home / "config.json").read_text())
    cfg["transports"] = transports
    (home / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(m.ConfigError, match=match):
        m.client_from_home(home, passphrase="pw")


def test_failed_init_leaves_nothing_behind(tmp_path: Path) -> None:
    home = tmp_path / "new-home"
    with pytest.raises(m.ConfigError):
        m.init_home(home, passphrase="pw", me="rpps:10000005479", transports=[{"kind": "owl"}])
    assert not home.exists()
    with pytest.raises(ValueError):
        m.init_home(home, passphrase="pw", me="not an identifier")
    assert not home.exists()
    # a failure half-way (the drop section refers to an unusable path) removes what was made,
    # and leaves a folder that existed before as it was
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(m.ConfigError):
        m.init_home(
            home, passphrase="pw", me="rpps:10000005479", transports=[{"kind": "drop", "path": ""}]
        )
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]
