"""Run a local delivery command: no shell, its own process group, bounded in time, output and number."""

import asyncio
import contextlib
import os
import pwd
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relays import replies
from relays.base import DeliveryContext, RelayError
from relays.instruments import PROCESS_RUNS
from schemas.config import ConfigError
from schemas.relay_options import ProcessOptions
from schemas.reply import Reply, Step

#: Output kept from each of stdout and stderr; the rest is read and dropped.
OUTPUT_CAP = 64 * 1024
#: How often to look for an exit that process.wait() does not report (pipes held open).
_EXIT_POLL = 0.1
#: How long the output may still be read after the command exited.
_DRAIN_GRACE = 1.0
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
    message on stdin, at most `concurrent_processes` at once (others wait, at most
    `timeout` seconds too)."""

    def __init__(self, options: ProcessOptions, relay_name: str, step: Step) -> None:
        self.timeout = options.timeout
        self.step = step
        self._limit = asyncio.Semaphore(options.concurrent_processes)
        self._cwd = options.cwd
        self._runs = {r: PROCESS_RUNS.labels(relay_name, r) for r in ("success", "failure", "timeout", "not_started")}
        self._user: tuple[int, int] | None = None
        if options.user is not None:
            try:
                entry = pwd.getpwnam(options.user)
            except KeyError:
                raise ConfigError.at(f"relay.{relay_name}.user", f"no such user: {options.user}") from None
            self._user = (entry.pw_uid, entry.pw_gid)
            name, home, shell = entry.pw_name, entry.pw_dir, entry.pw_shell
        else:
            try:
                entry = pwd.getpwuid(os.geteuid())
                name, home, shell = entry.pw_name, entry.pw_dir, entry.pw_shell
            except KeyError:  # a container may run us under a uid with no passwd entry
                name, home, shell = str(os.geteuid()), "/", "/bin/sh"
        # The service's own environment may hold secrets: like Postfix pipe(8), give the
        # command only a minimal one, unless the configuration spells one out.
        self._env = (
            dict(options.env)
            if options.env is not None
            else {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": home,
                "USER": name,
                "LOGNAME": name,
                "SHELL": shell or "/bin/sh",
            }
        )

    async def run(
        self, args: Sequence[str], message: bytes, recipients: Sequence[str], context: DeliveryContext
    ) -> Exit:
        """Run `args` with `message` on stdin, delivering to `recipients`. Raises RelayError when
        the command cannot be started (4.3.5) or outlives `timeout` (4.4.2; its whole process
        group is killed)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._limit.acquire()
        except TimeoutError:
            raise RelayError.from_reply(
                replies.timed_out(self.step, f"a free process slot ({self.timeout:g} s)")
            ) from None
        try:
            return await self._run(args, message, recipients, context)
        finally:
            self._limit.release()

    async def _run(
        self, args: Sequence[str], message: bytes, recipients: Sequence[str], context: DeliveryContext
    ) -> Exit:
        # A command may act before it has read its input, so once it starts it may have delivered.
        await context.sending(recipients)
        try:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self._cwd,
                env=self._env,
                start_new_session=True,  # its own process group, so a timeout kills its children too
                # uvloop has no user=/group=/extra_groups=; switching in the child works on every loop.
                preexec_fn=_switch_user(*self._user) if self._user else None,
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL in an argument
            self._runs["not_started"].inc()
            reason = getattr(exc, "strerror", None) or str(exc)
            raise RelayError.from_reply(replies.cannot_start(self.step, args[0], reason)) from None
        stdout, stderr = bytearray(), bytearray()
        io = asyncio.gather(
            _read_capped(process.stdout, stdout), _read_capped(process.stderr, stderr), _feed(process, message)
        )
        waiting = asyncio.ensure_future(process.wait())
        try:
            async with asyncio.timeout(self.timeout):
                # process.wait() also waits for the pipes to close, which a child that
                # left the process group may never do: the exit status is what counts.
                while not (await asyncio.wait({waiting}, timeout=_EXIT_POLL))[0] and process.returncode is None:
                    pass
                status = process.returncode
                assert status is not None  # noqa: S101 - the loop ends on an exit
        except TimeoutError:
            self._runs["timeout"].inc()
            _kill_group(process)
            await asyncio.wait({waiting}, timeout=_DRAIN_GRACE)  # bounded: an escaped child may hold the pipes
            raise RelayError.from_reply(
                replies.timed_out(self.step, f"{args[0]} to finish ({self.timeout:g} s)")
            ) from None
        except BaseException:  # cancelled: leave nothing running
            _kill_group(process)
            raise
        finally:
            await _finish_io(process, io)
            waiting.cancel()
        self._runs["success" if status == 0 else "failure"].inc()
        killed_by = -status if status < 0 else None
        return Exit(status if status >= 0 else None, killed_by, _text(stdout), _text(stderr))


async def _finish_io(process: asyncio.subprocess.Process, io: "asyncio.Future[tuple[None, None, None]]") -> None:
    """Let the output drain briefly after the exit: a child that left the process group may
    hold the pipes open forever, and the command's own exit status is what counts."""
    try:
        async with asyncio.timeout(_DRAIN_GRACE):
            await asyncio.shield(io)
    except (TimeoutError, asyncio.CancelledError):
        io.cancel()
        # A cancelled gather ends with its CancelledError set as its exception, which asyncio
        # logs at error level ("exception was never retrieved") unless someone retrieves it.
        io.add_done_callback(_retrieve)
    except Exception:  # noqa: S110 - a pipe error after the exit changes nothing
        pass
    # Closes our ends of the pipes. A private attribute: asyncio.subprocess.Process has no
    # public close (tests/canaries/test_stdlib.py fails when this changes).
    transport = getattr(process, "_transport", None)
    if transport is not None:
        transport.close()


def _retrieve(future: "asyncio.Future[tuple[None, None, None]]") -> None:
    if not future.cancelled():
        future.exception()


def _switch_user(uid: int, gid: int) -> Callable[[], None]:
    def switch() -> None:  # runs in the child between fork and exec: os calls only
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return switch


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


async def _read_capped(stream: asyncio.StreamReader | None, kept: bytearray) -> None:
    if stream is None:
        return
    while chunk := await stream.read(65536):
        if len(kept) < OUTPUT_CAP:
            kept += chunk[: OUTPUT_CAP - len(kept)]


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _text(output: bytes | bytearray) -> str:
    return output.decode("utf-8", "replace").strip()


def error_text(exit: Exit, pattern: str | None = None) -> str:
    """The program's own words: stdout, else stderr; with `pattern`, what it matches
    (its first group when it has one) in stdout or stderr, whichever matches."""
    if pattern:
        for output in (exit.stdout, exit.stderr):
            if match := re.search(pattern, output):
                group = match.group(1) if match.re.groups else None
                return _one_reply(group if group is not None else match.group(0))
    return _one_reply(exit.stdout or exit.stderr)


def _one_reply(text: str) -> str:
    # One printable line: it goes into an SMTP-style reply and a header.
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
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


def exit_reply(
    exit: Exit, step: Step, text: str, *, transient: frozenset[int], what: str, text_decides: bool = False
) -> Reply:
    """The outcome of a finished command. With `text_decides` (pipe), a leading `4.X.Y` or
    `5.X.Y` in `text` decides; otherwise the exit status does (those in `transient`, and
    death by a signal, are transient)."""
    if exit.status == 0:
        return replies.program_delivered(step, text)
    if text_decides and text[:2] in ("4.", "5."):
        # The program's own reply, as it wrote it: a parse, not a synthesis.
        reply = Reply.parse(550 if text[0] == "5" else 451, text, step)
        if reply.enhanced_status:
            return reply
    if exit.signal is not None:
        return replies.program_failed(step, text or f"{what} was killed by signal {exit.signal}", transient=True)
    meaning = _SYSEXITS.get(exit.status or 0)
    default = f"{what} exited with status {exit.status}" + (f" ({meaning})" if meaning else "")
    return replies.program_failed(step, text or default, transient=exit.status in transient)
