"""Header fields: produce them safely, read them leniently.

Producing: every value is checked for control characters (no header injection), non-ASCII
unstructured text becomes RFC 2047 encoded-words, non-ASCII parameters (file names) become
RFC 2231 extended parameters with continuations, and every line stays within 78 characters
(RFC 5322 §2.1.1). UTF-8 is the default charset; ISO-8859-1 is available for old readers.

Reading: the ``email`` package (``compat32`` policy, which parses without raising) splits the
fields; values are decoded here, falling back to the raw text rather than failing, because a
badly encoded subject must not make a message unreadable.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.errors
import email.header
import email.utils
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from email.message import Message

__all__ = [
    "check_address",
    "decode_text",
    "encode_params",
    "format_addresses",
    "format_message_ids",
    "header_line",
    "normalize_message_id",
    "parse_message_ids",
]

CRLF = "\r\n"
MAX_LINE = 78
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_ADDRESS_RE = re.compile(rf"{_DOT_ATOM}@{_DOMAIN}")
_ID_RE = re.compile(rf"{_DOT_ATOM}@(?:{_DOT_ATOM}|\[[!-Z^-~]*\])")
# RFC 2231 attribute-char: the characters allowed unencoded in an extended value
_ATTR_SAFE = "!#$&+-.^_`|~"
_FIELD_NAME = re.compile(r"[!-9;-~]+")


def check_value(value: str, what: str) -> str:
    """Reject header values that could inject a header or break the line structure."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str")
    if _CONTROL.search(value):
        raise ValueError(f"{what} contains a control character (line break, NUL, …)")
    return value


def check_address(address: str, what: str = "address") -> str:
    """Validate a bare ``local@domain`` address (ASCII dot-atom form); return it unchanged."""
    check_value(address, what)
    if len(address) > 254 or not _ADDRESS_RE.fullmatch(address):
        raise ValueError(f"malformed {what}: expected a bare address such as name@example.org")
    return address


def header_line(name: str, value: str, *, charset: str = "utf-8") -> str:
    """``Name: value`` folded to 78 columns with CRLF; non-ASCII text as RFC 2047 words.

    An ASCII value that looks like an encoded-word (``=?…?=``) is encoded too, so that it
    reads back as written.
    """
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"malformed header field name {name!r}")
    check_value(value, f"the {name} header")
    ascii_ok = value.isascii() and "=?" not in value
    if ascii_ok:
        h = email.header.Header(value, "us-ascii", header_name=name, maxlinelen=MAX_LINE)
    else:
        h = email.header.Header(
            value, _charset_for(value, charset), header_name=name, maxlinelen=MAX_LINE
        )
    return f"{name}: {h.encode(linesep=CRLF)}{CRLF}"


def raw_header_line(name: str, value: str) -> str:
    """A header whose value is already in wire form (ASCII, structured): checked, not encoded."""
    check_value(value, f"the {name} header")
    if not value.isascii():
        raise ValueError(f"the {name} header must be ASCII")
    if len(name) + len(value) + 2 > 998:
        raise ValueError(f"the {name} header is longer than 998 characters")
    return f"{name}: {value}{CRLF}"


def _charset_for(text: str, preferred: str) -> str:
    preferred = preferred.lower()
    if preferred not in ("utf-8", "iso-8859-1"):
        raise ValueError("charset must be 'utf-8' or 'iso-8859-1'")
    if preferred == "iso-8859-1":
        try:
            text.encode("iso-8859-1")
        except UnicodeEncodeError:
            return "utf-8"  # a character Latin-1 cannot hold: UTF-8 for this value only
    return preferred


def format_addresses(addresses: Sequence[tuple[str | None, str]], *, charset: str = "utf-8") -> str:
    """``Name <a@b>, c@d`` with display names RFC 2047-encoded where needed."""
    out = []
    for name, address in addresses:
        check_address(address)
        if name:
            check_value(name, "a display name")
            out.append(email.utils.formataddr((name, address), charset=_charset_for(name, charset)))
        else:
            out.append(address)
    return ", ".join(out)


def addresses_header(
    name: str, addresses: Sequence[tuple[str | None, str]], *, charset: str = "utf-8"
) -> str:
    """An address-list header, one address per folded line when it would not fit."""
    parts = format_addresses(addresses, charset=charset).split(", ")
    line = f"{name}: "
    lines = []
    for i, part in enumerate(parts):
        piece = part + ("," if i < len(parts) - 1 else "")
        if len(line) + len(piece) > MAX_LINE and line.strip() != f"{name}:":
            lines.append(line.rstrip())
            line = " "
        line += piece + " "
    lines.append(line.rstrip())
    return CRLF.join(lines) + CRLF


def normalize_message_id(value: str) -> str:
    """``<id@host>`` or ``id@host`` (with stray spaces) → ``id@host``; ValueError if malformed."""
    if not isinstance(value, str):
        raise TypeError("a message id must be a str")
    bare = "".join(value.split())
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1]
    if len(bare) > 250 or not _ID_RE.fullmatch(bare):
        raise ValueError("malformed message id: expected id@host")
    return bare


def parse_message_ids(value: str | None) -> tuple[str, ...]:
    """Every well-formed ``<id@host>`` of a References / In-Reply-To field (others skipped)."""
    if not value:
        return ()
    out = []
    for token in re.findall(r"<([^<>]*)>", value):
        try:
            out.append(normalize_message_id(token))
        except ValueError:
            continue
    if not out and "<" not in value:
        with contextlib.suppress(ValueError):
            out.append(normalize_message_id(value))
    return tuple(out)


def format_message_ids(ids: Iterable[str]) -> str:
    """``<a@b> <c@d>`` from bare or bracketed ids (validated)."""
    return " ".join(f"<{normalize_message_id(i)}>" for i in ids)


def format_date(when: dt.datetime) -> str:
    """An RFC 5322 date from a timezone-aware datetime."""
    if not isinstance(when, dt.datetime):
        raise TypeError("date must be a datetime")
    if when.tzinfo is None:
        raise ValueError("date must be timezone-aware")
    return email.utils.format_datetime(when)


def check_parties(sender: str, recipients: Sequence[str]) -> None:
    """ValueError unless ``sender`` is an address and ``recipients`` a non-empty sequence of
    addresses."""
    check_address(sender, "sender")
    if isinstance(recipients, str) or not recipients:
        raise ValueError("recipients must be a non-empty sequence of addresses")
    for r in recipients:
        check_address(r, "recipient")


def opening_headers(
    sender: tuple[str | None, str],
    recipients: Sequence[str],
    date: dt.datetime,
    message_id: str,
    subject: str,
    *,
    charset: str = "utf-8",
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
) -> list[str]:
    """The fields every message medsecure builds starts with, in this order: From (display
    name, address), To, Date, Message-ID (``message_id`` bare), Subject; then In-Reply-To and
    References for a reply (``in_reply_to`` joins ``references`` unless it is there already)."""
    headers = [
        addresses_header("From", [sender], charset=charset),
        addresses_header("To", [(None, r) for r in recipients]),
        raw_header_line("Date", format_date(date)),
        raw_header_line("Message-ID", f"<{message_id}>"),
        header_line("Subject", subject, charset=charset),
    ]
    refs = list(references)
    if in_reply_to is not None:
        headers.append(raw_header_line("In-Reply-To", format_message_ids([in_reply_to])))
        if normalize_message_id(in_reply_to) not in {normalize_message_id(r) for r in refs}:
            refs.append(in_reply_to)
    if refs:
        headers.append(raw_header_line("References", format_message_ids(refs)))
    return headers


def encode_params(params: Sequence[tuple[str, str]], *, charset: str = "utf-8") -> list[str]:
    """MIME parameters as ``name="value"`` segments; RFC 2231 for non-ASCII or long values.

    Non-ASCII values are percent-encoded in ``charset`` (``name*=utf-8''…``) and split into
    numbered continuations (``name*0*=…; name*1*=…``) so that no line exceeds 78 columns.
    """
    out: list[str] = []
    for name, value in params:
        check_value(value, f"the {name} parameter")
        if value.isascii() and '"' not in value and "\\" not in value and len(value) <= 60:
            out.append(f'{name}="{value}"')
            continue
        cs = _charset_for(value, charset)
        if value.isascii():
            # long or quoted ASCII: plain continuations of quoted strings
            if '"' in value or "\\" in value:
                encoded = urllib.parse.quote(value, safe=_ATTR_SAFE, encoding=cs)
                out.extend(_continuations(name, encoded, "us-ascii"))
            else:
                pieces = [value[i : i + 60] for i in range(0, len(value), 60)]
                out.extend(f'{name}*{i}="{piece}"' for i, piece in enumerate(pieces))
            continue
        encoded = urllib.parse.quote(value, safe=_ATTR_SAFE, encoding=cs)
        out.extend(_continuations(name, encoded, cs))
    return out


def _continuations(name: str, encoded: str, charset: str) -> list[str]:
    prefix = f"{charset}''"
    if len(name) + len(encoded) + len(prefix) + 2 <= 72:
        return [f"{name}*={prefix}{encoded}"]
    out: list[str] = []
    rest = encoded
    i = 0
    while rest:
        head = f"{name}*{i}*=" + (prefix if i == 0 else "")
        cut = min(max(72 - len(head), 12), len(rest))
        # never split a %XX escape
        pct = rest.rfind("%", max(0, cut - 2), cut)
        if pct != -1 and cut < len(rest):
            cut = pct
        out.append(head + rest[:cut])
        rest = rest[cut:]
        i += 1
    return out


def params_header(
    name: str, main: str, params: Sequence[tuple[str, str]], *, charset: str = "utf-8"
) -> str:
    """``Name: main; p1="…"`` with each parameter on its own folded line when needed."""
    check_value(main, f"the {name} header")
    segments = encode_params(params, charset=charset)
    line = f"{name}: {main}"
    lines = []
    for seg in segments:
        if len(line) + len(seg) + 2 > MAX_LINE:
            lines.append(line + ";")
            line = " " + seg
        else:
            line += "; " + seg
    lines.append(line)
    return CRLF.join(lines) + CRLF


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def unsurrogate(text: str) -> str:
    """Undo the ``surrogateescape`` the email parser applies to 8-bit header bytes: decode
    them as UTF-8, or as ISO-8859-1 when they are not UTF-8 (as old mailers send)."""
    if not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    raw = text.encode("ascii", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("iso-8859-1")


def decode_text(value: str | None) -> str | None:
    """Decode RFC 2047 encoded-words (any charset Python knows, UTF-8 and ISO-8859-1 included);
    on a malformed or unknown encoding, the raw text."""
    if value is None:
        return None
    value = unsurrogate(str(value))
    if "=?" not in value:
        return " ".join(value.split()) if "\n" in value else value
    try:
        decoded = str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError, email.errors.MessageError):
        return value
    return decoded


def decode_filename(msg: Message) -> str | None:
    """The part's file name: RFC 2231 ``filename*`` (any continuation and charset), plain
    ``filename``, or the Content-Type ``name`` fallback; RFC 2047 words inside are decoded too
    (a common non-standard form). Control characters are removed."""
    name: object
    try:
        name = msg.get_filename()
        if name is None:
            name = msg.get_param("name")
            if isinstance(name, tuple):
                name = email.utils.collapse_rfc2231_value(name)
    except (ValueError, LookupError, UnicodeError, TypeError, IndexError):
        return None
    if not isinstance(name, str):
        return None
    text = decode_text(name) or ""
    text = _CONTROL.sub("", text).replace("\t", " ").strip()
    return text or None


def first_address(value: str | None) -> str | None:
    """The first address of an address-list field, lower-cased domain, or None."""
    addrs = all_addresses(value)
    return addrs[0] if addrs else None


def all_addresses(value: str | None) -> tuple[str, ...]:
    """Every bare address of an address-list field (malformed entries skipped)."""
    if not value:
        return ()
    try:
        pairs = email.utils.getaddresses([unsurrogate(value)])
    except (ValueError, IndexError, TypeError):
        return ()
    out = []
    for _name, addr in pairs:
        addr = addr.strip()
        if addr and _ADDRESS_RE.fullmatch(addr):
            out.append(addr)
    return tuple(out)


def parse_date(value: str | None) -> dt.datetime | None:
    """An RFC 5322 date, or None when absent or malformed."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(unsurrogate(value))
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    return when
