"""SMTP replies read straight off a connection's transport: for pipelined commands and the message data."""

import asyncio
import contextlib
from collections.abc import Callable, Iterator

import aiosmtplib
from aiosmtplib import SMTPResponse

#: Most bytes of one reply, all its lines together (aiosmtplib keeps 32 KiB for the replies it
#: reads itself): past it the reply is garbage, not SMTP, and the connection is dropped.
MAX_REPLY_BYTES = 64 * 1024


class ReplyTooLongError(aiosmtplib.SMTPResponseException):
    """A reply (all its lines) went past MAX_REPLY_BYTES, or more replies came than were asked for."""

    def __init__(self, message: str = f"reply too long (over {MAX_REPLY_BYTES} bytes)") -> None:
        super().__init__(-1, message)


class ReplyReader(asyncio.Protocol):
    """Collects complete replies from the transport, and says when it may be written to again.

    Installed on the transport by `reading_replies`. `replies` grows as
    replies arrive; `read()` and `writable()` wait, each with its own time
    limit, and raise the connection's error (lost, malformed, too long) once
    there is one. Memory is bounded whatever the server sends: one reply's
    lines are kept as bytes, at most MAX_REPLY_BYTES of them, and no more
    replies than `expect()` asked for.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.replies: list[SMTPResponse] = []
        self._text = bytearray()  # the lines of the reply under way, joined by "\n"
        self._lines = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._paused = False
        self._expected = 0

    @property
    def clean(self) -> bool:
        """Nothing left over and nothing wrong: the connection may go back to aiosmtplib."""
        return self._error is None and not self._buffer and not self._lines and len(self.replies) == self._expected

    @property
    def closed_after_replies(self) -> bool:
        """The replies asked for came, then the server closed the connection, and nothing else:
        not another reply, nor a part of one (the replies stand)."""
        return (
            isinstance(self._error, aiosmtplib.SMTPServerDisconnected)
            and not self._buffer
            and not self._lines
            and len(self.replies) == self._expected
        )

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return  # the connection is being dropped: nothing more is kept
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if len(line) < 3 or not line[:3].isdigit():
                self._set_error(aiosmtplib.SMTPResponseException(-1, f"malformed reply line {line[:80]!r}"))
                return
            if self._lines:
                self._text += b"\n"
            self._text += line[4:].strip(b" \t\r\n")
            self._lines += 1
            if line[3:4] != b"-":
                if self._expected and len(self.replies) >= self._expected:
                    # Replies nobody asked for: out of step, and each one would be kept.
                    self._set_error(ReplyTooLongError("more replies than commands"))
                    return
                self.replies.append(SMTPResponse(int(line[:3]), self._text.decode("utf-8", "replace")))
                self._text = bytearray()
                self._lines = 0
            elif len(self._text) > MAX_REPLY_BYTES:
                break
        if len(self._text) + len(self._buffer) > MAX_REPLY_BYTES:
            self._buffer.clear()
            self._text.clear()
            self._set_error(ReplyTooLongError())
            return
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_error(aiosmtplib.SMTPServerDisconnected("Connection lost"))

    def eof_received(self) -> bool:
        self._set_error(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def _set_error(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, deadline: float) -> None:
        """Until something happens on the connection; TimeoutError at `deadline` (loop time).
        A timer on the waiter, not asyncio.timeout: that costs a task lookup and a
        cancellation per wait, several times per message (bench/)."""
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()

    async def writable(self, timeout: float) -> None:  # noqa: ASYNC109 - see _wait
        """Until the transport's write buffer is below its high-water mark again, within `timeout` s."""
        if self._paused:
            deadline = asyncio.get_running_loop().time() + timeout
            while self._paused:
                await self._wait(deadline)
        if self._error is not None:
            raise self._error

    def expect(self, count: int) -> None:
        """The number of replies the commands written ask for: more or fewer is not `clean`."""
        self._expected = count

    async def read(self, count: int, timeout: float) -> None:  # noqa: ASYNC109 - see _wait
        """Until `count` replies are in `replies`, within `timeout` s; raises TimeoutError, or on a
        lost connection (keeping the replies that came)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.replies) < count:
            await self._wait(deadline)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


@contextlib.contextmanager
def reading_replies(transport: asyncio.Transport, after: Callable[[ReplyReader], None]) -> Iterator[ReplyReader]:
    """A new ReplyReader reads `transport` for the block; the protocol it had (aiosmtplib's)
    gets it back afterwards, and then `after(reader)` judges what the reader saw, even when
    the block raised.

    aiosmtplib reads one reply per command and drops data it did not ask for, so
    pipelined commands and the message data are answered through our own reader.
    """
    original = transport.get_protocol()
    reader = ReplyReader()
    transport.set_protocol(reader)
    try:
        yield reader
    finally:
        transport.set_protocol(original)
        after(reader)
