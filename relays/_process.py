"""Run a local delivery command: no shell, its own process group, bounded in time, output and number."""

import asyncio
import contextlib
import os
import pwd
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from relays import replies
from relays.base import RelayError
from schemas.config import ConfigError
from schemas.relay_options import ProcessOptions
from schemas.reply import Reply

#: Output kept from each of stdout and stderr; the rest is read and dropped.
OUTPUT_CAP = 64 * 1024
#: Longest error text put in a reply.
REPLY_TEXT_CAP = 512


@dataclass(frozen=True)
class Exit:
    """How a command ended: its status (None when killed by `signal`), and what it printed."""

    status: int | None
    signal: int | None
    stdout: str
    stderr: str


class ProcessRunner:
    """Starts commands with `asyncio.create_subprocess_exec` (never a shell), the
    message on stdin, at most `concurrent_processes` at once (others wait)."""

    def __init__(self, options: ProcessOptions, relay_name: str, step: str) -> None:
        self.timeout = options.timeout
        self.step = step
        self._limit = asyncio.Semaphore(options.concurrent_processes)
        self._cwd = os.path.expanduser(options.cwd) if options.cwd else None
        self._env = dict(options.env) if options.env is not None else None
        self._user: tuple[int, int] | None = None
        if options.user is not None:
            try:
                entry = pwd.getpwnam(options.user)
            except KeyError:
                raise ConfigError.at(f"relay.{relay_name}.user", f"no such user: {options.user}") from None
            self._user = (entry.pw_uid, entry.pw_gid)

    async def run(self, args: Sequence[str], message: bytes) -> Exit:
        """Run `args` with `message` on stdin. Raises RelayError when the command cannot
        be started (4.3.5) or outlives `timeout` (4.4.2; its whole process group is killed)."""
        async with self._limit:
            try:
                process = await asyncio.create_subprocess_exec(
                    *args,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    cwd=self._cwd,
                    env=self._env,
                    start_new_session=True,  # its own process group, so a timeout kills its children too
                    user=self._user[0] if self._user else None,
                    group=self._user[1] if self._user else None,
                    extra_groups=[] if self._user else None,
                )
            except (OSError, ValueError) as exc:  # ValueError: a NUL in an argument
                reason = getattr(exc, "strerror", None) or str(exc)
                raise RelayError.from_reply(replies.cannot_start(self.step, args[0], reason)) from None
            try:
                async with asyncio.timeout(self.timeout):
                    stdout, stderr, _ = await asyncio.gather(
                        _read_capped(process.stdout), _read_capped(process.stderr), _feed(process, message)
                    )
                    status = await process.wait()
            except TimeoutError:
                _kill_group(process)
                await process.wait()
                raise RelayError.from_reply(
                    replies.timed_out(self.step, f"{args[0]} to finish ({self.timeout:g} s)")
                ) from None
            except BaseException:  # cancelled: leave nothing running
                _kill_group(process)
                with contextlib.suppress(ProcessLookupError):
                    await asyncio.shield(process.wait())
                raise
        killed_by = -status if status < 0 else None
        return Exit(status if status >= 0 else None, killed_by, _text(stdout), _text(stderr))


async def _feed(process: asyncio.subprocess.Process, message: bytes) -> None:
    assert process.stdin is not None  # noqa: S101 - stdin=PIPE
    try:
        process.stdin.write(message)
        await process.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the command did not read all of it; its exit status says how that went
    finally:
        process.stdin.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await process.stdin.wait_closed()


async def _read_capped(stream: asyncio.StreamReader | None) -> bytes:
    kept = bytearray()
    if stream is None:
        return bytes(kept)
    while chunk := await stream.read(65536):
        if len(kept) < OUTPUT_CAP:
            kept += chunk[: OUTPUT_CAP - len(kept)]
    return bytes(kept)


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _text(output: bytes) -> str:
    return output.decode("utf-8", "replace").strip()


def error_text(exit: Exit, pattern: str | None = None) -> str:
    """The program's own words: stdout, else stderr; with `pattern`, what it matches
    (its first group when it has one) in stdout or stderr, whichever matches."""
    if pattern:
        for output in (exit.stdout, exit.stderr):
            if match := re.search(pattern, output):
                text = match.group(1) if match.re.groups else match.group(0)
                return _one_reply(text)
    return _one_reply(exit.stdout or exit.stderr)


def _one_reply(text: str) -> str:
    text = " ".join(text.split())  # one line: it goes into an SMTP-style reply
    return text[:REPLY_TEXT_CAP]


#: sysexits.h names, to say what a bare exit status meant.
_SYSEXITS = {
    64: "usage error",
    65: "data format error",
    66: "cannot open input",
    67: "addressee unknown",
    68: "host name unknown",
    69: "service unavailable",
    70: "internal software error",
    71: "system error",
    72: "critical OS file missing",
    73: "cannot create output file",
    74: "input/output error",
    75: "temporary failure",
    76: "remote error in protocol",
    77: "permission denied",
    78: "configuration error",
}


def exit_reply(exit: Exit, step: str, text: str, *, transient: frozenset[int], what: str) -> Reply:
    """The outcome of a finished command: a leading `4.X.Y`/`5.X.Y` in `text` decides;
    otherwise the exit status does (those in `transient`, and death by a signal, are transient)."""
    if exit.status == 0:
        return Reply(code=250, enhanced_status="2.0.0", message=f"2.0.0 {text or 'Delivered'}", command=step)
    reply = (
        Reply.parse(550, text, step) if text[:2] == "5." else Reply.parse(451, text, step) if text[:2] == "4." else None
    )
    if reply is not None and reply.enhanced_status:
        return reply
    if exit.signal is not None:
        default = f"{what} was killed by signal {exit.signal}"
        return Reply(code=451, enhanced_status="4.3.0", message=f"4.3.0 {text or default}", command=step)
    meaning = _SYSEXITS.get(exit.status or 0)
    default = f"{what} exited with status {exit.status}" + (f" ({meaning})" if meaning else "")
    if exit.status in transient:
        return Reply(code=451, enhanced_status="4.3.0", message=f"4.3.0 {text or default}", command=step)
    return Reply(code=554, enhanced_status="5.3.0", message=f"5.3.0 {text or default}", command=step)
