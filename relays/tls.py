"""Client TLS contexts from the `tls` options (the old ssl.wrap_socket keywords)."""

import ssl
from collections.abc import Callable

from schemas.config import ConfigError
from schemas.relay_options import TlsOptions

_MINIMUM_VERSION = {
    "PROTOCOL_TLSv1": ssl.TLSVersion.TLSv1,
    "PROTOCOL_TLSv1_1": ssl.TLSVersion.TLSv1_1,
    "PROTOCOL_TLSv1_2": ssl.TLSVersion.TLSv1_2,
}


def _default() -> ssl.SSLContext:
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)


def client_context(
    options: TlsOptions, path: str, *, verify_by_default: bool = True, new: Callable[[], ssl.SSLContext] = _default
) -> ssl.SSLContext:
    """An SSLContext for a client; a bad file or cipher list is a ConfigError at `path`.

    `verify_by_default` is False for opportunistic STARTTLS, which (as Postfix's
    `may` level) encrypts without verifying unless `cert_reqs` says otherwise. `new` makes
    the context before the options apply (SMTP's resumes sessions: relays/smtp/resumption.py).
    """
    context = new()
    cert_reqs = options.cert_reqs or ("CERT_REQUIRED" if verify_by_default else "CERT_NONE")
    if cert_reqs == "CERT_NONE":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif cert_reqs == "CERT_OPTIONAL":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_OPTIONAL
    try:
        if options.ca_certs:
            context.load_verify_locations(cafile=options.ca_certs)
        if options.certfile:
            context.load_cert_chain(options.certfile, options.keyfile)
        if options.ciphers:
            context.set_ciphers(options.ciphers)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError.at(path, f"cannot set up TLS: {exc}") from None
    if options.ssl_version in _MINIMUM_VERSION:
        context.minimum_version = _MINIMUM_VERSION[options.ssl_version]
    return context
