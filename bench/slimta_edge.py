"""The peer: slimta 5.0.5's HTTP edge, relaying synchronously through its static SMTP relay.

slimta.edge.wsgi.WsgiEdge (served by gevent's WSGIServer) -> slimta.queue.proxy.ProxyQueue
(no storage: the HTTP reply waits for the relay) -> slimta.relay.smtp.static.StaticSmtpRelay
with a pool of 8 connections, kept open between messages (idle_timeout; slimta's default
of none would QUIT after every message). The request is slimta's wire format:
`Content-Type: message/rfc822`, the message as the body, X-Envelope-Sender and
X-Envelope-Recipient as base64, optional X-Ehlo. A delivered message is answered
204 with `X-Smtp-Reply: 250; message="2.6.0 Message accepted for delivery"`.

Runs in bench/.venv-slimta (gevent), not in the project's .venv:
    bench/.venv-slimta/bin/python bench/slimta_edge.py --port 8025 --smtp-port 2525
"""

import argparse
import warnings

warnings.simplefilter("ignore")  # pkg_resources' deprecation warning at slimta's import

from gevent.pywsgi import WSGIServer  # noqa: E402
from slimta.edge.wsgi import WsgiEdge  # noqa: E402
from slimta.queue.proxy import ProxyQueue  # noqa: E402
from slimta.relay.smtp.static import StaticSmtpRelay  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--smtp-host", default="127.0.0.1")
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=60,
        help="keep connections this long; 0 = slimta's default, QUIT after each",
    )
    args = parser.parse_args()
    relay = StaticSmtpRelay(
        args.smtp_host,
        args.smtp_port,
        pool_size=args.pool,
        ehlo_as="slimta.example.com",
        idle_timeout=args.idle_timeout or None,
    )
    edge = WsgiEdge(ProxyQueue(relay), hostname="slimta.example.com")
    # log=None: no access log line per request (mailrelay runs at --log-level warning).
    WSGIServer((args.host, args.port), edge, log=None).serve_forever()


if __name__ == "__main__":
    main()
