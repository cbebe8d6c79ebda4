"""Canaries for the standard library's private names we rely on: each fails naming the name."""

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

import pytest

from tests.canaries import LOOPS

SRCFILE = (
    "app/logs.py setup_logging sets logging._srcfile = None (logging HOWTO, 'Optimization') so that "
    "no log call looks up its caller"
)
PROCESS_TRANSPORT = (
    "relays/_process.py _finish_io closes asyncio.subprocess.Process._transport (the loop's subprocess "
    "transport) to close our ends of the pipes"
)


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_closing_a_process_transport_ends_reading_a_pipe_an_escaped_child_holds(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def run() -> None:
        # The shell exits at once; its background child keeps the shell's stdout open.
        process = await asyncio.create_subprocess_exec(
            "sh", "-c", "sleep 30 & exit 0", stdout=asyncio.subprocess.PIPE, start_new_session=True
        )
        try:
            await asyncio.wait_for(_exited(process), 10)
            transport = getattr(process, "_transport", None)
            assert transport is not None, f"{PROCESS_TRANSPORT}: the attribute is gone"
            assert callable(getattr(transport, "close", None)), f"{PROCESS_TRANSPORT}: it has no close()"
            transport.close()
            assert process.stdout is not None
            try:
                left = await asyncio.wait_for(process.stdout.read(), 5)
            except TimeoutError:
                pytest.fail(f"{PROCESS_TRANSPORT}: closing it no longer ends reading the pipe")
            assert left == b"", f"{PROCESS_TRANSPORT}: reading after close() gave {left!r}"
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run())


async def _exited(process: asyncio.subprocess.Process) -> None:
    # process.wait() may also wait for the pipes (it does on newer Pythons), which the
    # background child holds: the exit status is what counts, as in relays/_process.py.
    waiting = asyncio.ensure_future(process.wait())
    try:
        while not (await asyncio.wait({waiting}, timeout=0.05))[0] and process.returncode is None:
            pass
    finally:
        waiting.cancel()


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _CallerLookups(logging.Logger):
    lookups = 0

    def findCaller(self, stack_info: bool = False, stacklevel: int = 1) -> tuple[str, int, str, str | None]:
        self.lookups += 1
        return super().findCaller(stack_info, stacklevel)


def test_logging_srcfile_none_skips_the_caller_lookup() -> None:
    assert hasattr(logging, "_srcfile"), f"{SRCFILE}: the attribute is gone"
    logger = _CallerLookups("canary.srcfile")
    kept = _Kept()
    logger.addHandler(kept)
    saved = logging._srcfile
    try:
        logging._srcfile = None
        logger.warning("skipped")
        assert logger.lookups == 0, f"{SRCFILE}: findCaller runs all the same"
        # The check above means something only if logging looks when it is set, as it is at
        # import (setup_logging may have run in this process already).
        logging._srcfile = os.path.normcase(logging.__file__)
        logger.warning("looked up")
        assert logger.lookups == 1, f"{SRCFILE}: findCaller is not how logging finds the caller any more"
    finally:
        logging._srcfile = saved
    assert [r.getMessage() for r in kept.records] == ["skipped", "looked up"]


PEER_CHAIN = (
    "relays/dane.py peer_chain reads the certificates the server sent through SSLObject._sslobj."
    "get_unverified_chain() (public as SSLObject.get_unverified_chain from Python 3.13)"
)


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_the_chain_a_tls_server_sent_is_readable(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    import ssl

    import trustme

    from relays.dane import peer_chain

    ca = trustme.CA()
    issued = ca.issue_cert("chain.test")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    issued.configure_cert(server_context)
    client_context = ssl.create_default_context()
    client_context.check_hostname, client_context.verify_mode = False, ssl.CERT_NONE

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client closes
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()

    async def run() -> list[bytes]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context)
            tls = writer.get_extra_info("ssl_object")
            try:
                return peer_chain(tls)
            except AttributeError as exc:
                raise AssertionError(f"{PEER_CHAIN}: {exc}") from None
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()

    loop = loop_factory()
    try:
        chain = loop.run_until_complete(run())
    finally:
        loop.close()
    assert chain, f"{PEER_CHAIN}: no certificate"
    assert chain[0] == ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode()), f"{PEER_CHAIN}: not DER"
