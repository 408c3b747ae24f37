"""DICOM TLS (PS3.15 B.1): the ``ssl.SSLContext`` objects the SCP and the C-STORE SCU use.

TLS 1.2 or newer only (BCP 195). A client certificate signed by the configured CA is
the only real caller authentication DICOM has: AE titles are sent in clear and
trivially spoofed, so ``require_client_certificate`` is how callers are restricted
where their addresses are not stable.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from node.config import TlsOptions

__all__ = [
    "TlsConfigError",
    "client_context",
    "complete_server_handshake",
    "peer_certificate_subject",
    "server_context",
]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsConfigError(ValueError):
    """A TLS setting names a missing or unusable file; the message says which."""


def _readable(path: Path | None, what: str, where: str) -> Path:
    if path is None:
        raise TlsConfigError(f"{where}: TLS is enabled but {what} is not set")
    if not path.is_file():
        raise TlsConfigError(f"{where}: {what} {path} does not exist or is not a file")
    return path


def _load_pair(context: ssl.SSLContext, tls: TlsOptions, where: str) -> None:
    certificate = _readable(tls.certificate, "certificate", where)
    private_key = _readable(tls.private_key, "private_key", where)
    try:
        context.load_cert_chain(certificate, private_key)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{where}: cannot use certificate {certificate} with key {private_key}: {exc.reason}") from None


def _load_ca(context: ssl.SSLContext, tls: TlsOptions, where: str) -> None:
    ca_bundle = _readable(tls.ca_bundle, "ca_bundle", where)
    try:
        context.load_verify_locations(cafile=ca_bundle)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{where}: cannot read CA bundle {ca_bundle}: {exc.reason}") from None


class _DeferredHandshakeContext(ssl.SSLContext):
    """Wraps accepted sockets without the handshake: pynetdicom wraps them on its one
    accept thread, where a caller that connects and stays silent would stall every other
    caller. ``complete_server_handshake`` then runs it on the association's own thread."""

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True,  # type: ignore[override]
                    suppress_ragged_eofs=True, server_hostname=None, session=None):
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                                   suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
                                   session=session)


def complete_server_handshake(sock: object, timeout_s: float) -> str | None:
    """Run the TLS handshake on an accepted socket; returns why it failed, or None."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    previous = sock.gettimeout()
    sock.settimeout(timeout_s)
    try:
        sock.do_handshake()
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc.strerror or 'no reason given'}"
    except TimeoutError:
        return f"TLS handshake not completed within {timeout_s:.0f} s"
    except OSError as exc:
        return f"TLS handshake failed: {exc.strerror or 'connection closed during the handshake'}"
    finally:
        try:
            sock.settimeout(previous)
        except OSError:
            pass
    return None


def server_context(tls: TlsOptions, *, where: str = "scp.tls") -> ssl.SSLContext:
    """The SCP's context: its certificate and key; with ``require_client_certificate``,
    callers without a certificate signed by ``ca_bundle`` fail the handshake."""
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    _load_pair(context, tls, where)
    if tls.require_client_certificate:
        _load_ca(context, tls, where)
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_bundle is not None:
        # A CA without the requirement: a presented certificate is checked, none is fine.
        _load_ca(context, tls, where)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(tls: TlsOptions, *, where: str = "destination") -> ssl.SSLContext:
    """The SCU's context for one destination: the peer's certificate is always verified
    (against ``ca_bundle``, else the system's CAs); our own pair is sent when configured."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.check_hostname = tls.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.ca_bundle is not None:
        _load_ca(context, tls, where)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate is not None or tls.private_key is not None:
        _load_pair(context, tls, where)
    return context


def peer_certificate_subject(sock: object) -> str | None:
    """The common name of the certificate the peer presented on ``sock``, if any."""
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        cert = getpeercert()
    except (ValueError, OSError):
        return None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
