"""Every reply mailrelay makes up comes from relays/replies.py, reads as its own parse would, and
names a command of schemas/reply.py's one definition, which the API description lists."""

import ast
import re
from pathlib import Path
from typing import get_args

import pytest

import app
from relays import replies
from schemas.delivery import RecipientResult
from schemas.reply import STEP_MEANINGS, Command, Reply, SmtpCommand, Step

RELAYS = Path(replies.__file__).parent
APP = Path(app.__file__).parent
_STEP_LITERAL = re.compile(r"\[[A-Z_]+\]")


def _string_constants(*folders: Path) -> set[str]:
    return {
        node.value
        for folder in folders
        for path in folder.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


#: One of each synthesised reply.
SYNTHESISED = [
    replies.timed_out("RCPT", "the reply to RCPT"),
    replies.connection_failed("mx.example.net:25", "Connection refused"),
    replies.connection_lost("[SEND_DATA]", maybe_delivered=True),
    replies.tls_failed("STARTTLS", "CERTIFICATE_VERIFY_FAILED (mx.example.net:25)"),
    replies.not_offered("AUTH", "AUTH"),
    replies.cannot_start("[PIPE]", "/usr/bin/deliver", "No such file or directory"),
    replies.tls_refused("454 4.7.0 TLS not available"),
    replies.protocol_error("[SEND_DATA]", "fewer replies than recipients"),
    replies.invalid_characters("MAIL"),
    replies.eight_bit_refused(),
    replies.utf8_refused(),
    replies.dns_failure("example.net", "SERVFAIL"),
    replies.no_such_domain("example.net"),
    replies.no_mail_host("example.net", ipv4_only=True),
    replies.null_mx("example.net"),
    replies.no_domain(),
    replies.http_answer("relay.example.net", 204, "No Content"),
    replies.http_answer("relay.example.net", 403, "Forbidden"),
    replies.http_answer("relay.example.net", 502, "Bad Gateway"),
    replies.http_answer("relay.example.net", 307, "Temporary Redirect"),
    replies.program_delivered("[DOVECOT]", ""),
    replies.program_failed("[MAILDROP]", "maildrop exited with status 75", transient=True),
    replies.program_failed("[PIPE]", "unknown user", transient=False),
    replies.argument_is_an_option("[PIPE]", "-oi"),
    replies.blackholed("4f1c"),
    replies.deadline_reached(30, maybe_delivered=False),
    replies.partial_delivery(
        [
            RecipientResult(recipient="a@example.net", reply=Reply.parse(250, "2.0.0 ok", "[SEND_DATA]")),
            RecipientResult(recipient="b@example.net", reply=Reply.parse(550, "5.1.1 no such user", "RCPT")),
        ],
        Reply.parse(550, "5.1.1 no such user", "RCPT"),
    ),
]


@pytest.mark.parametrize("reply", SYNTHESISED, ids=lambda r: f"{r.code}-{r.message[:30]}")
def test_a_synthesised_reply_reads_as_its_own_text_would(reply: Reply) -> None:
    assert Reply.parse(reply.code, reply.message, reply.command) == reply


def test_the_http_answer_follows_the_status_class() -> None:
    codes = [replies.http_answer("h", status, "x").code for status in (200, 299, 400, 499, 500, 302, 101)]
    assert codes == [250, 250, 554, 554, 451, 451, 451]


def _reply_constructions(path: Path) -> list[str]:
    """Where `path` builds a Reply from constants: any `Reply(...)`, and `Reply.parse(...)` with a
    literal code (a parse of a server's or program's reply takes its code from that reply)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "Reply":
            found.append(f"{path.name}:{node.lineno} Reply(...)")
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "parse"
            and isinstance(func.value, ast.Name)
            and func.value.id == "Reply"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.append(f"{path.name}:{node.lineno} Reply.parse({node.args[0].value!r}, ...)")
    return found


def test_replies_are_made_up_only_in_relays_replies() -> None:
    sources = [p for p in RELAYS.rglob("*.py") if p != Path(replies.__file__)]
    assert sources
    found = [where for path in sources for where in _reply_constructions(path)]
    assert found == [], "build these in relays/replies.py"


@pytest.mark.parametrize("reply", SYNTHESISED, ids=lambda r: f"{r.code}-{r.message[:30]}")
def test_a_synthesised_reply_names_a_command_of_the_definition(reply: Reply) -> None:
    assert reply.command is None or reply.command in get_args(Command)


def test_the_steps_written_in_the_code_are_exactly_the_defined_ones() -> None:
    # Typed code cannot pass an unknown step (mypy checks the Literal); this also catches an
    # untyped one, and a step the definition still lists after the code stopped using it.
    written = {c for c in _string_constants(RELAYS, APP) if _STEP_LITERAL.fullmatch(c)}
    assert written == set(get_args(Step))


def test_every_defined_smtp_command_is_sent_by_the_relays() -> None:
    assert set(get_args(SmtpCommand)) <= _string_constants(RELAYS)


def test_the_api_describes_every_command_and_only_those() -> None:
    description = Reply.model_json_schema()["properties"]["command"]["description"]
    assert set(STEP_MEANINGS) == set(get_args(Step))
    assert all(command in description for command in get_args(Command))
    assert set(_STEP_LITERAL.findall(description)) == set(get_args(Step))
