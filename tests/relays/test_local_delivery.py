"""`dovecot` and `maildrop` with the real programs: dovecot-lda against a standalone master, maildrop with a filter."""

from pathlib import Path

from tests.conftest import context, envelope, opened
from tests.servers.dovecot import dovecot
from tests.servers.process import require_program, stop

MESSAGE = b"From: alice@example.com\r\nSubject: local\r\n\r\nHello\r\n"
BIG = MESSAGE + b"x" * 2000 + b"\r\n"  # over carol's 1 KB quota


def lda(config: Path) -> str:
    require_program("dovecot-lda", "/usr/lib/dovecot/dovecot-lda")
    return f"relay:\n  d:\n    type: dovecot\n    extra_args: ['-c', '{config}']\n"


async def test_dovecot_lda_outcomes() -> None:
    with dovecot() as store:
        async with opened(lda(store.config)) as relays:
            delivered, unknown = await relays["d"].deliver(
                envelope("alice@example.test", "ghost@example.test", message=MESSAGE), context()
            )
            (quota,) = await relays["d"].deliver(envelope("carol@example.test", message=BIG), context())
        (stored,) = store.maildir("alice")
    assert (delivered.status, delivered.reply.code, delivered.reply.command) == ("delivered", 250, "[DOVECOT]")
    assert b"Subject: local" in stored
    assert (unknown.status, unknown.reply.code) == ("permanent_failure", 554)
    assert "status 67 (addressee unknown)" in unknown.reply.message
    assert quota.status == "permanent_failure"
    assert "Quota exceeded" in quota.reply.message


async def test_dovecot_quota_tempfail_and_a_stopped_master() -> None:
    with dovecot("quota_full_tempfail = yes\n") as store:
        async with opened(lda(store.config)) as relays:
            (quota,) = await relays["d"].deliver(envelope("carol@example.test", message=BIG), context())
            stop(store.process)
            (no_master,) = await relays["d"].deliver(envelope("alice@example.test", message=MESSAGE), context())
    assert (quota.status, quota.reply.code) == ("transient_failure", 451)
    assert "Quota exceeded" in quota.reply.message
    # dovecot logs the reason to its log file, so the reply names the status
    assert (no_master.status, no_master.reply.code) == ("transient_failure", 451)
    assert "status 75" in no_master.reply.message


def maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def maildrop(filter_file: Path) -> str:
    require_program("maildrop")
    return f"relay:\n  m:\n    type: maildrop\n    extra_args: ['{filter_file}']\n"


async def test_maildrop_outcomes(tmp_path: Path) -> None:
    box = maildir(tmp_path / "Maildir")
    filters = {
        "deliver": f'to "{box}/"\n',
        "tempfail": "EXITCODE=75\nexit\n",
        "reject": 'echo "rejected by filter"\nEXITCODE=77\nexit\n',
    }
    outcomes = {}
    for name, text in filters.items():
        path = tmp_path / f"{name}.filter"
        path.write_text(text)
        path.chmod(0o600)
        async with opened(maildrop(path)) as relays:
            outcomes[name] = await relays["m"].deliver(
                envelope("alice@example.test", "bob@example.test", message=MESSAGE), context()
            )
    async with opened(maildrop(tmp_path / "missing.filter")) as relays:
        (missing,) = await relays["m"].deliver(envelope("alice@example.test", message=MESSAGE), context())

    assert [r.status for r in outcomes["deliver"]] == ["delivered", "delivered"]
    (stored,) = (box / "new").iterdir()  # one run per message: the filter delivers it once
    assert stored.read_bytes() == MESSAGE
    assert [(r.status, r.reply.code) for r in outcomes["tempfail"]] == [("transient_failure", 451)] * 2
    reject = outcomes["reject"][0]
    assert (reject.status, reject.reply.code, reject.reply.message) == (
        "permanent_failure",
        554,
        "5.3.0 rejected by filter",
    )
    assert missing.status == "transient_failure"  # maildrop says 75 for a missing filter file
    assert missing.reply.message.startswith("4.3.0 Unable to open filter file")  # "maildrop: " prefix removed
