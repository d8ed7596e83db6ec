"""A hardened XML reader: no DTD, no entity, no external reference, bounded size.

Built directly on expat (what ``xml.etree`` uses underneath) so that a document type
declaration is refused whatever the document's encoding — a byte scan for ``<!DOCTYPE`` would
miss it in UTF-16. Without a DTD there are no entities to expand (billion laughs) and nothing
external to fetch (XXE). Elements come out as ``xml.etree.ElementTree`` elements with
``{namespace}local`` tags.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import NoReturn
from xml.parsers import expat

from ._errors import MailFormatError

__all__ = ["parse_xml"]


class _Refused(Exception):
    pass


def _refuse(*_args: object) -> NoReturn:
    raise _Refused


def _name(raw: str) -> str:
    ns, sep, local = raw.rpartition(" ")
    return f"{{{ns}}}{local}" if sep else raw


def parse_xml(data: bytes, *, max_bytes: int, what: str) -> ET.Element:
    """Parse ``data`` (at most ``max_bytes``) into an element tree; MailFormatError on a DTD,
    an entity, malformed XML or an oversized document."""
    if len(data) > max_bytes:
        raise MailFormatError(f"{what} is larger than {max_bytes} bytes")
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartDoctypeDeclHandler = _refuse
    parser.EntityDeclHandler = _refuse
    parser.UnparsedEntityDeclHandler = _refuse
    parser.ExternalEntityRefHandler = _refuse
    parser.NotationDeclHandler = _refuse

    def start(tag: str, attrs: dict[str, str]) -> None:
        builder.start(_name(tag), {_name(k): v for k, v in attrs.items()})

    def end(tag: str) -> None:
        builder.end(_name(tag))

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
        root = builder.close()
    except _Refused:
        raise MailFormatError(f"{what} declares a DTD or entities, which are refused") from None
    except expat.ExpatError as exc:
        raise MailFormatError(f"{what} is not well-formed XML") from exc
    except (ValueError, UnicodeError, AssertionError) as exc:
        raise MailFormatError(f"{what} is not well-formed XML") from exc
    if not isinstance(root, ET.Element):  # pragma: no cover - TreeBuilder always returns one
        raise MailFormatError(f"{what} has no root element")
    return root
