"""The `mailrelay` command: serve, check-config, openapi."""

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import math
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Literal, Self

import uvicorn

from app.config import DEFAULT_SOURCE, LoadedConfig, load_config
from app.http_protocol import bounded_protocol
from app.lifespan import Services
from app.logs import chosen_format, setup_logging
from app.main import create_app, openapi_document
from app.metrics import RELOADS
from app.workers import supervise
from relays import dkim
from relays.registry import open_relays
from schemas.config import ConfigError, ServiceConfig

logger = logging.getLogger("mailrelay")

CONFIG_HELP = "configuration file (YAML, slimta's `relay:` section); default: $MAILRELAY_CONFIG, else the embedded default (one `blackhole` relay)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    return command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailrelay",
        description="Deliver mail synchronously over HTTP through slimta-style relays.",
        epilog="Run `mailrelay COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the HTTP service",
        description="Run the HTTP service. Without --config or $MAILRELAY_CONFIG it serves the embedded default: "
        "one relay named `blackhole` that accepts and discards every message.",
    )
    serve.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s)",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=8080,
        help="port to listen on (default: %(default)s)",
    )
    serve.add_argument(
        "--insecure-allow-unauthenticated",
        action="store_true",
        help="listen on a non-loopback address even with no API key configured: anyone who reaches the port can "
        "send mail through every relay (also the setting mailrelay.auth.insecure_allow_unauthenticated)",
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="worker processes sharing the port (default: %(default)s); each has its own relays and pools",
    )
    serve.add_argument(
        "--log-format",
        choices=["auto", "json", "text"],
        default=None,
        help="JSON lines, text, or auto: text on a terminal, else JSON (default: mailrelay.log_format, auto)",
    )
    serve.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="(default: %(default)s)",
    )
    serve.set_defaults(command=_serve)

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file",
        description="Validate a configuration file. Exit 0 with one line per relay when valid; exit 1 with one line "
        "per problem, each naming its key path (relay.NAME.OPTION), when not. Warnings go to standard error.",
    )
    check.add_argument("path", nargs="?", metavar="PATH", help=CONFIG_HELP)
    check.set_defaults(command=_check_config)

    openapi = commands.add_parser(
        "openapi",
        help="print the OpenAPI document",
        description="Print the service's OpenAPI document as JSON.",
    )
    openapi.add_argument("--output", metavar="FILE", help="write to FILE instead of standard output")
    openapi.set_defaults(command=_openapi)

    from app import send  # the client commands: nothing of the service is loaded for them

    sender = commands.add_parser(
        "send",
        help="send a message through a running mailrelay",
        description="Build a message (or take a raw one) and deliver it through a running mailrelay; print each "
        "recipient's outcome. Exit 0 when all were delivered, 75 when a failure is transient, 67/69 when permanent.",
    )
    send.add_arguments(sender)
    sender.set_defaults(command=send.run)
    # sendmail(8)'s own option syntax (-oi, -t, -fsender): argparse does not parse it.
    sendmail = commands.add_parser(
        "sendmail", help="the sendmail(8) interface: the message on standard input", add_help=False, prefix_chars="\0"
    )
    sendmail.add_argument("args", nargs=argparse.REMAINDER)
    sendmail.set_defaults(command=_sendmail)
    return parser


def _sendmail(args: argparse.Namespace) -> int:
    from app.sendmail import main as sendmail_main

    status: int = sendmail_main(args.args)
    return status


def _positive(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to 64")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 1 to 65535")
    return int(text)


def _load(path: str | None) -> LoadedConfig | None:
    """The configuration, or None after printing every problem."""
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        _print_problems(exc)
        return None
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return loaded


def _print_problems(exc: ConfigError) -> None:
    for warning in exc.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in exc.problems:
        print(str(problem), file=sys.stderr)


def _check_config(args: argparse.Namespace) -> int:
    loaded = _load(args.path)
    if loaded is None:
        return 1
    # DKIM keys as start-up reads them, and whether DNS publishes each one's public half.
    problems, warnings = asyncio.run(dkim.check_config(loaded.config))
    _print_problems(ConfigError(problems, warnings))
    if problems:
        return 1
    relays = loaded.config.relay
    print(f"{loaded.source}: valid, {len(relays)} relay(s)")
    for name, options in relays.items():
        print(f"{name}: {options.type}: {options.describe()}")
    return 0


def _openapi(args: argparse.Namespace) -> int:
    text = json.dumps(openapi_document(), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        print(f"{args.output}: cannot write: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return 1
    # Refuse before logging is set up: a refusal is one line on stderr and nothing else changes.
    if args.worker_fd is None and not _exposure_allowed(loaded, args, quiet=True):
        return 1
    setup_logging(args.log_level, args.log_format or loaded.config.mailrelay.log_format)
    if args.worker_fd is None:
        logger.info(
            "configuration from %s: %d relay(s)",
            loaded.source,
            len(loaded.config.relay),
            extra={"event": "config_loaded", "source": loaded.source, "relays": sorted(loaded.config.relay)},
        )
        if loaded.source == DEFAULT_SOURCE:
            logger.info("no --config or $MAILRELAY_CONFIG: serving the embedded default (relay `blackhole`)")
        _exposure_allowed(loaded, args)  # logs the INSECURE warning where it applies
    try:
        if args.workers > 1 and args.worker_fd is None:
            return supervise(args, loaded.source)
        return _run(loaded, args)
    except KeyboardInterrupt:
        return 0


Exposure = Literal["safe", "insecure", "refused"]


def network_exposure(config: ServiceConfig, host: str, insecure_flag: bool) -> Exposure:
    """The loopback rule. An open relay on a network is a spam cannon: without API keys, listen on
    loopback only, unless told otherwise (`insecure_flag`, or the setting insecure_allow_unauthenticated)."""
    auth = config.mailrelay.auth
    if auth.keys or is_loopback(host):
        return "safe"
    if insecure_flag or auth.insecure_allow_unauthenticated:
        return "insecure"
    return "refused"


def _exposure_allowed(loaded: LoadedConfig, args: argparse.Namespace, *, quiet: bool = False) -> bool:
    """The loopback rule at start-up: a refusal printed, an override logged (unless `quiet`)."""
    exposure = network_exposure(loaded.config, args.host, args.insecure_allow_unauthenticated)
    if exposure == "insecure" and not quiet:
        logger.warning(
            "INSECURE: listening on %s with no API key configured; anyone who reaches this port can send mail "
            "through every relay",
            args.host,
        )
    elif exposure == "refused":
        print(
            f"refusing to listen on {args.host} with no API key configured: anyone reaching the port could send "
            "mail. Configure mailrelay.auth.keys or $MAILRELAY_API_KEYS, listen on 127.0.0.1, or pass "
            "--insecure-allow-unauthenticated",
            file=sys.stderr,
        )
    return exposure != "refused"


def is_loopback(host: str) -> bool:
    """Only literal loopback addresses and `localhost`; any other name could resolve anywhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    """uvicorn's server without signal handlers of its own: `_Signals` has them all."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's would replace ours while serving, then re-raise what they caught to the
        # previous handlers once stopped. That serve() enters this method is the one uvicorn
        # internal relied on here (tests/canaries/test_uvicorn_server.py).
        yield


#: Seconds the answers of deliveries cut at the end of shutdown_grace get to be written before
#: the connections still open are dropped and the server closes.
CUT_MARGIN = 0.5
#: Seconds after the port closes before requests still arriving are refused.
SETTLE = 0.5
#: Every response from SIGTERM on: the client (or balancer) reconnects, to an instance that stays.
_CLOSE = (b"connection", b"close")


class _Signals:
    """The service's signals, all handled one way: as event loop callbacks, from before the
    relays are built until the server has stopped.

    SIGTERM drains, then stops, on a timeline a load balancer can follow:
    1. at once /readyz turns 503, while deliveries are still served for `drain_delay`, each
       answer with `Connection: close`, so balancers that probe /readyz (and clients that pool
       connections) move to other instances before anything is refused;
    2. after drain_delay the listener closes (a new connection is refused, which balancers retry
       elsewhere) and idle connections are closed; requests that had arrived are served, one
       whose body is still arriving SETTLE later is refused (503, draining); running
       deliveries get `shutdown_grace` to finish;
    3. those still running then are cut, answered like a deadline cut (451 4.4.7, possibly
       delivered where the data had left), and get CUT_MARGIN for their answers to be written;
       connections still open after that are dropped. The process exits within
       drain_delay + shutdown_grace + CUT_MARGIN, plus closing the relays.
    SIGINT does the same without the drain delay (nothing balances a terminal). A second SIGTERM,
    or SIGINT during a drain, skips what is left of the delay and the grace: running deliveries are
    cut at once; a SIGTERM during a SIGINT drain is a supervisor passing on the Ctrl+C its workers
    also got, and changes nothing. One more goes to uvicorn (two SIGINTs: exit without waiting).
    SIGHUP reloads the configuration; one that comes during start-up is acted on once started.
    """

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server: _Server | None = None
        self.services: Services | None = None
        self._stop_requested = False
        self._reload_requested = False
        self._draining: signal.Signals | None = None  # the signal that started the drain
        self._hurry = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> Self:
        loop = asyncio.get_running_loop()
        for sig in self.HANDLED:
            loop.add_signal_handler(sig, self._received, sig)
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in self.HANDLED:
            loop.remove_signal_handler(sig)
        # Stopped, the process exits 0 by itself: a late SIGTERM (a supervisor passing on the
        # Ctrl+C its workers also got) must not turn that into death by a signal.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    async def settled(self) -> None:
        """Until the drain's own task has seen the end (uvicorn's shutdown may finish first: its
        `drained` line would be lost), at most a second: it only has its last poll and log to do."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)

    def attach(self, server: _Server) -> None:
        self.server = server
        server.should_exit = self._stop_requested

    def started(self, services: Services) -> None:
        self.services = services
        if self._reload_requested:
            self._spawn(reload_configuration(services, self.args))

    def _received(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            if self.services is None:
                self._reload_requested = True  # the configuration is read again once started
            else:
                self._spawn(reload_configuration(self.services, self.args))
        elif self.server is None:
            self._stop_requested = True
        elif self.services is None or not self.server.started:
            self.server.handle_exit(sig, None)  # still starting: nothing served yet, nothing to drain
        elif self._draining is None:
            self._draining = sig
            delay = self.services.current.config.mailrelay.drain_delay if sig == signal.SIGTERM else 0.0
            self._spawn(self._drain_then_stop(self.server, self.services, delay, sig.name))
        elif self._draining == signal.SIGINT and sig == signal.SIGTERM:
            pass  # the supervisor passing on a Ctrl+C this worker got itself
        elif not self._hurry.is_set():
            self._hurry.set()
        else:
            self.server.handle_exit(sig, None)

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pause(self, seconds: float) -> None:
        """`seconds`, or less if a second signal says to hurry."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._hurry.wait()

    async def _drain_then_stop(self, server: _Server, services: Services, delay: float, name: str) -> None:
        settings = services.current.config.mailrelay
        grace = settings.shutdown_grace
        services.ready = False
        _close_after_each_response(server)
        logger.info(
            "%s: readiness 503; deliveries served for %g s more (drain_delay), then refused; running ones then "
            "get up to %g s",
            name,
            delay,
            grace,
            extra={"event": "draining", "running": services.active, "drain_delay": delay, "grace": grace},
        )
        await self._pause(delay)
        _stop_accepting(server)
        server.should_exit = True  # uvicorn's own shutdown follows within its tick (0.1 s)
        # A request that reached the service as the port closed is served; a body still arriving
        # SETTLE later is refused (503 draining: nothing tried), as is anything after that.
        asyncio.get_running_loop().call_later(SETTLE, setattr, services, "draining", True)
        logger.info(
            "new deliveries refused; %d running, up to %g s to finish",
            services.active,
            grace,
            extra={"event": "refusing", "running": services.active, "grace": grace},
        )
        if await services.wait_idle(grace, self._hurry):
            logger.info("drained: no delivery running", extra={"event": "drained"})
            return
        cut = services.cut_running()
        logger.warning(
            "shutdown grace over: %d deliveries cut, answered 451 4.4.7 (possibly delivered where the data had left)",
            cut,
            extra={"event": "drained", "running": services.active, "cut": cut},
        )
        loop = asyncio.get_running_loop()
        end = loop.time() + CUT_MARGIN
        # Until every answer is written (uvicorn closes each connection after its answer). Cut again
        # meanwhile: a delivery that was waiting for a slot may have got one freed by the cut.
        while (services.active or server.server_state.connections) and loop.time() < end:
            services.cut_running()
            await asyncio.sleep(0.02)
        left = list(server.server_state.connections)
        if left:
            # Still reading a body, or the client reads no answer: dropped rather than left to
            # uvicorn, whose own timeout would answer a running request with a bare 500.
            logger.warning(
                "%d connection(s) still open %g s after the cut; dropped",
                len(left),
                CUT_MARGIN,
                extra={"event": "connections_dropped", "connections": len(left)},
            )
            for connection in left:
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()


def _stop_accepting(server: _Server) -> None:
    """What uvicorn's shutdown does first, now rather than at its next tick: close the listening
    sockets (a new connection is refused, which balancers retry elsewhere), close idle
    connections, and close the others once their answer is sent."""
    for listener in server.servers:
        listener.close()
    for connection in list(server.server_state.connections):
        connection.shutdown()


def _close_after_each_response(server: _Server) -> None:
    """`Connection: close` on every response from now on: uvicorn adds these default headers to each
    response (and ends the connection after one that has it); it rebuilds them from the config once a
    second, hence both."""
    server.config.encoded_headers = [*server.config.encoded_headers, _CLOSE]
    server.server_state.default_headers = [*server.server_state.default_headers, _CLOSE]


def _run(loaded: LoadedConfig, args: argparse.Namespace) -> int:
    async def serve() -> int:
        with _Signals(args) as signals:
            # Relays are built before the server starts, so a failing custom factory
            # is one clear line and exit 1 instead of a lifespan traceback.
            try:
                relays = await open_relays(loaded.config)
            except ConfigError as exc:
                _print_problems(exc)
                return 1
            settings = loaded.config.mailrelay

            def started(services: Services) -> None:
                signals.started(services)
                _freeze_heap()

            app = create_app(loaded.config, relays, on_start=started)
            # A worker's inherited socket: uvicorn's fd= would wrap it as a unix socket (no TCP_NODELAY).
            sockets = [socket.socket(fileno=args.worker_fd)] if args.worker_fd is not None else None
            where = {"worker_fd": args.worker_fd} if sockets else {"host": args.host, "port": args.port}
            protocol = bounded_protocol(
                settings.max_recipients,
                settings.body_timeout,
                send_timeout=settings.send_timeout,
                max_connections=settings.max_connections,
            )
            cap = protocol.open_connections.cap
            fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if fd_limit != resource.RLIM_INFINITY and cap >= fd_limit:
                logger.warning(
                    "mailrelay.max_connections (%d) is not below the file descriptor limit (%d): clients can "
                    "exhaust it before the limit refuses them, and relays then fail",
                    cap,
                    fd_limit,
                    extra={"event": "connection_limit", "max_connections": cap, "fd_limit": fd_limit},
                )
            server = _Server(
                uvicorn.Config(
                    app,
                    host=args.host,
                    port=args.port,
                    log_level=args.log_level,
                    log_config=None,  # ours (app.logs) stays in place
                    # JSON logs have one line per delivery instead
                    access_log=chosen_format(args.log_format or settings.log_format) == "text",
                    lifespan="on",
                    # No WebSocket routes: an upgrade would hand the connection to a protocol that
                    # the connection bound (app/http_protocol.py) does not see close.
                    ws="none",
                    server_header=False,
                    # The connection bound lives in the protocol, not uvicorn's limit_concurrency: that
                    # one counts tasks too, answers only once a head arrived (never, for a silent
                    # connection) and refuses the newcomer, where closing an idle one serves /healthz.
                    http=protocol,
                    # Only a backstop: _Signals cuts running deliveries at the end of the grace and
                    # drops what is left CUT_MARGIN later, before uvicorn would answer them 500.
                    timeout_graceful_shutdown=math.ceil(settings.shutdown_grace + CUT_MARGIN) + 2,
                )
            )
            signals.attach(server)
            logger.info(
                "starting: pid %d",
                os.getpid(),
                extra={"event": "startup", "relays": len(relays), "max_connections": cap, **where},
            )
            await server.serve(sockets=sockets)
            await signals.settled()
            logger.info("stopped", extra={"event": "shutdown"})
        return 0 if server.started else 1

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(serve())


async def reload_configuration(services: Services, args: argparse.Namespace) -> None:
    """SIGHUP: a valid new configuration replaces the old one as a whole; an invalid one, or one
    the loopback rule refuses for this address, changes nothing."""
    try:
        loaded = load_config(args.config)
        if network_exposure(loaded.config, args.host, args.insecure_allow_unauthenticated) == "refused":
            raise ConfigError.at("mailrelay.auth.keys", f"no API key, and the service listens on {args.host}")
        await services.swap(loaded.config)
    except Exception as exc:  # any failure keeps the running configuration
        RELOADS.labels("failure").inc()
        reason = "; ".join(str(p) for p in exc.problems) if isinstance(exc, ConfigError) else repr(exc)
        logger.error(
            "configuration reload refused, keeping the running one: %s",
            reason,
            extra={"event": "config_reload", "result": "failure"},
        )
        return
    RELOADS.labels("success").inc()
    logger.info(
        "configuration reloaded from %s: %d relay(s)",
        loaded.source,
        len(loaded.config.relay),
        extra={"event": "config_reload", "result": "success", "relays": sorted(loaded.config.relay)},
    )
    await services.retired()
    # The old configuration's objects were frozen at start-up: unfrozen, collected, and what
    # lives now frozen again, so every reload does not keep one more set of relays forever.
    gc.unfreeze()
    _freeze_heap()


def _freeze_heap() -> None:
    """What exists now lives as long as the process: out of the collector's sight, a full
    collection no longer walks it (pauses of tens of ms under load, bench/)."""
    gc.collect()
    gc.freeze()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it on Linux
        return None
    return uvloop.new_event_loop
