"""Every wire-format label and constant of medsecure v1, quoted verbatim from the specs.

The envelope, public identities, key files and the message plaintext are specified in
docs/format.md (sections cited below); signed statements in docs/trust.md; the relay's in
docs/relay.md; audit checkpoints at the top of medsecure/audit.py (docs/traceability.md).
Every label here appears literally there, and no other module spells a label out (a test
checks it): change one only with a new format version.
"""

from __future__ import annotations

from typing import Final

# --- docs/format.md §2: envelope framing -------------------------------------------------------
ENVELOPE_MAGIC: Final = b"MEDSEC\x00\x01"  # 8 bytes: name, NUL, format version 1
FORMAT_VERSION: Final = 1
HEADER_LENGTH_BYTES: Final = 4  # big-endian uint32

# --- §3: suites ---------------------------------------------------------------------------------
SUITE_HYBRID: Final = "hybrid"  # MLKEM768-X25519 KEM, Ed25519 + ML-DSA-65 signatures
SUITE_CLASSIC: Final = "classic"  # X25519 KEM, Ed25519 signature
SUITES: Final = (SUITE_HYBRID, SUITE_CLASSIC)

# HPKE KEM identifiers (RFC 9180 §7.1 for DHKEM(X25519); draft-ietf-hpke-pq for MLKEM768-X25519).
KEM_X25519: Final = 0x0020
KEM_MLKEM768_X25519: Final = 0x647A
KEM_FOR_SUITE: Final = {SUITE_HYBRID: KEM_MLKEM768_X25519, SUITE_CLASSIC: KEM_X25519}

# --- §4: labels ---------------------------------------------------------------------------------
LABEL_HPKE_INFO: Final = b"medsecure/v1/hpke-info"
LABEL_PAYLOAD_KEY: Final = b"medsecure/v1/payload-key"
LABEL_COMMITMENT: Final = b"medsecure/v1/key-commitment"
LABEL_SENDER_KEY: Final = b"medsecure/v1/sender-key"
LABEL_TRAILER_KEY: Final = b"medsecure/v1/trailer-key"
LABEL_PAYLOAD_HASH: Final = b"medsecure/v1/payload-hash"
LABEL_SIGNATURE: Final = b"medsecure/v1/signature"
LABEL_FINGERPRINT: Final = b"medsecure/v1/fingerprint"
LABEL_KEYFILE_AAD: Final = b"medsecure/v1/keyfile"

# --- §5: the one message every authentication failure shares (opaque on purpose) ---------------
AUTH_FAILED: Final = "envelope authentication failed"

# --- §5: sizes and bounds -------------------------------------------------------------------------
CONTENT_KEY_BYTES: Final = 32
SALT_BYTES: Final = 32
COMMITMENT_BYTES: Final = 32
FINGERPRINT_BYTES: Final = 32
TAG_BYTES: Final = 16
NONCE_BYTES: Final = 12
DEFAULT_CHUNK_SIZE: Final = 1 << 20
MIN_CHUNK_SIZE: Final = 1 << 14
MAX_CHUNK_SIZE: Final = 1 << 22
DEFAULT_MAX_RECIPIENTS: Final = 1000
# Largest header for N recipients: fixed fields + N hybrid stanzas (fingerprint, KEM id, 1168-byte
# HPKE output, CBOR heads) + the encrypted sender identity. Checked before the header is read.
HEADER_FIXED_BUDGET: Final = 8192
HEADER_PER_RECIPIENT_BUDGET: Final = 1280

# Public key lengths (raw encodings from `cryptography`).
X25519_PUBLIC_BYTES: Final = 32
MLKEM768_PUBLIC_BYTES: Final = 1184
ED25519_PUBLIC_BYTES: Final = 32
MLDSA65_PUBLIC_BYTES: Final = 1952
ED25519_SIGNATURE_BYTES: Final = 64
MLDSA65_SIGNATURE_BYTES: Final = 3309

# HPKE output: enc || AEAD(content key) — fixed per KEM.
HPKE_WRAPPED_BYTES: Final = {
    KEM_X25519: 32 + CONTENT_KEY_BYTES + TAG_BYTES,
    KEM_MLKEM768_X25519: 1120 + CONTENT_KEY_BYTES + TAG_BYTES,
}

# --- §7: key files ------------------------------------------------------------------------------
KEYFILE_MAGIC: Final = b"MEDSECK\x01"  # version 1: no public key in the header (read only)
KEYFILE_MAGIC_V2: Final = b"MEDSECK\x02"  # version 2: the public identity in the header
KDF_ARGON2ID: Final = "argon2id"
# Defaults: RFC 9106 §4 second recommended option (64 MiB, t=3, p=4).
KDF_DEFAULT_ITERATIONS: Final = 3
KDF_DEFAULT_MEMORY_KIB: Final = 64 * 1024
KDF_DEFAULT_LANES: Final = 4
# Bounds on parameters read from a (possibly hostile) key file.
KDF_MAX_ITERATIONS: Final = 10
KDF_MAX_MEMORY_KIB: Final = 256 * 1024
KDF_MIN_MEMORY_KIB: Final = 8 * 1024
KDF_MAX_LANES: Final = 8
KEYFILE_MAX_BYTES: Final = 64 * 1024

# --- §6: text form of a public identity ---------------------------------------------------------
PUBLIC_TEXT_PREFIX: Final = "msp1"
FINGERPRINT_TEXT_PREFIX: Final = "ms1"

# --- §10: the message plaintext (manifest, then the documents' bytes) ---------------------------
MESSAGE_MAGIC: Final = b"MEDSECM\x01"  # 8 bytes: name, then the message format version 1
MANIFEST_VERSION: Final = 1
MESSAGE_ID_LENGTH: Final = 26  # ULID layout, Crockford base32
MAX_MANIFEST: Final = 1 << 20  # the manifest is at most 1 MiB
MAX_DOCUMENTS: Final = 1000
MESSAGE_KINDS: Final = ("message", "receipt")
RECEIPT_REQUESTS: Final = ("delivered", "read")
RECEIPT_STATUSES: Final = ("delivered", "read", "rejected")

# --- docs/trust.md: signed statements about keys ------------------------------------------------
LABEL_STATEMENT: Final = b"medsecure/v1/statement"
STATEMENT_TEXT_PREFIX: Final = "mst1"

# --- docs/relay.md: key bundles and signed requests of the relay protocol -----------------------
LABEL_RELAY_BUNDLE: Final = b"medsecure/v1/relay-bundle"
LABEL_RELAY_REQUEST: Final = b"medsecure/v1/relay-request"  # ML-DSA-65 context of a request

# --- audit log checkpoints (medsecure/audit.py, docs/traceability.md) ---------------------------
LABEL_AUDIT_CHECKPOINT: Final = b"medsecure/v1/audit-checkpoint"
LABEL_AUDIT_RECORD_MAC: Final = b"medsecure/v1/audit-record-mac"  # HKDF info of the record MAC key
