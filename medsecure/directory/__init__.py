"""Directories: where practitioners, their mailboxes, endpoints and keys are found.

One small protocol, :class:`Directory` (``lookup(ref)``, ``search(...)``, plus a batched
``lookup_many``), and its backends: :class:`MemoryDirectory`, :class:`FileDirectory` (a JSON or
CBOR file), :class:`FhirDirectory` (the ANS Annuaire Santé FHIR API v2), :class:`CachedDirectory`
(offline cache) and :class:`ChainDirectory` (merge sources).

A directory says who a practitioner is and which keys it *publishes*; whether a key really
belongs to them is a :class:`medsecure.trust.TrustPolicy` decision.
"""

from ._base import Directory, Ref, merge_practitioners, normalize_ref
from ._compose import CachedDirectory, ChainDirectory
from ._fhir import FhirDirectory, practitioners_from_bundle
from ._local import FileDirectory, MemoryDirectory

__all__ = [
    "CachedDirectory",
    "ChainDirectory",
    "Directory",
    "FhirDirectory",
    "FileDirectory",
    "MemoryDirectory",
    "Ref",
    "merge_practitioners",
    "normalize_ref",
    "practitioners_from_bundle",
]
