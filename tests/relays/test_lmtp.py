"""`lmtp` against dovecot's real LMTP server, and aiosmtpd's LMTP for scripted per-recipient replies."""

from tests.conftest import context, envelope, opened
from tests.servers.dovecot import dovecot
from tests.servers.smtp import Script, smtp_server


def lmtp(port: int, *extra: str) -> str:
    lines = [f"    {e}" for e in extra]
    return (
        "\n".join(["relay:", "  store:", "    type: lmtp", "    host: 127.0.0.1", f"    port: {port}", *lines]) + "\n"
    )


async def test_dovecot_answers_each_recipient_after_the_data() -> None:
    # carol's quota is 1 KB: a 2 KB message is over it.
    message = b"From: alice@example.com\r\nSubject: lmtp\r\n\r\n" + b"x" * 2000 + b"\r\n"
    with dovecot() as store:
        async with opened(lmtp(store.lmtp_port)) as relays:
            results = await relays["store"].deliver(
                envelope("alice@example.test", "ghost@example.test", "carol@example.test", message=message), context()
            )
        assert [r.status for r in results] == ["delivered", "permanent_failure", "permanent_failure"], results
        alice, ghost, carol = (r.reply for r in results)
        assert (alice.code, alice.command) == (250, "[SEND_DATA]")
        assert "Saved" in alice.message
        assert (ghost.code, ghost.enhanced_status, ghost.command) == (550, "5.1.1", "RCPT")
        assert (carol.code, carol.enhanced_status, carol.command) == (552, "5.2.2", "[SEND_DATA]")
        assert results[0].host == f"127.0.0.1:{store.lmtp_port}"
        (stored,) = store.maildir("alice")
        assert b"Subject: lmtp" in stored
        assert store.maildir("carol") == []


async def test_dovecot_connection_is_reused_after_lmtp_replies() -> None:
    with dovecot() as store:
        async with opened(lmtp(store.lmtp_port)) as relays:
            for n in range(3):
                (result,) = await relays["store"].deliver(
                    envelope("bob@example.test", message=f"Subject: {n}\r\n\r\nhi\r\n".encode()), context()
                )
                assert result.status == "delivered"
            pool = relays["store"].pool  # type: ignore[attr-defined]
            assert pool.idle_count == 1
        assert len(store.maildir("bob")) == 3


async def test_scripted_lmtp_replies_keep_rcpt_order() -> None:
    script = Script(
        rcpt={"nobody@example.test": "550 5.1.1 No such user"},
        lmtp_data={"full@example.test": "452 4.2.2 Mailbox full", "bad@example.test": "554 5.6.0 Content rejected"},
    )
    with smtp_server(script, lmtp=True) as server:
        async with opened(lmtp(server.port)) as relays:
            recipients = [
                "ok@example.test",
                "full@example.test",
                "nobody@example.test",
                "bad@example.test",
                "ok2@example.test",
            ]
            results = await relays["store"].deliver(envelope(*recipients), context())
            again = await relays["store"].deliver(envelope("ok@example.test"), context())
    assert [(r.recipient, r.reply.code) for r in results] == [
        ("ok@example.test", 250),
        ("full@example.test", 452),
        ("nobody@example.test", 550),
        ("bad@example.test", 554),
        ("ok2@example.test", 250),
    ]
    assert [r.status for r in again] == ["delivered"]
    assert server.connection_count == 1  # the connection survived the multi-reply data phase
