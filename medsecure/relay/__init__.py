"""The relay protocol, shared by the reference server (:mod:`medsecure.relay.server`, extra
``relay``) and :class:`~medsecure.transports.RelayTransport`: request signatures (RFC 9421 with
the caller's identity keys), ``Content-Digest`` (RFC 9530) over streamed bodies, key bundles,
problem documents (RFC 9457) and the OpenAPI description. See docs/relay.md.
"""

from ._bundle import KeyBundle, sign_bundle
from ._openapi import openapi_document
from ._problems import PROBLEMS, Problem, problem_type
from ._signing import SIGNATURE_TAG, VerifiedRequest, sign_request, verify_request

__all__ = [
    "PROBLEMS",
    "SIGNATURE_TAG",
    "KeyBundle",
    "Problem",
    "VerifiedRequest",
    "openapi_document",
    "problem_type",
    "sign_bundle",
    "sign_request",
    "verify_request",
]
