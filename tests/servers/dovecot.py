"""dovecot's real LMTP server, standalone (nothing under /etc/dovecot is read or touched)."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers.process import free_port, require_program, stop, traversable_tmpdir, wait_greeting

#: dovecot's passwd-file refuses uid 0; nobody/nogroup own the mailboxes.
MAIL_UID = MAIL_GID = 65534
#: Users of the test mail store; carol's quota is 1 KB, so a bigger message is over quota.
USERS = {"alice": "", "bob": "", "carol": "userdb_quota_rule=*:storage=1K"}

CONFIG = """\
instance_name = mailrelay-test-{port}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
ssl = no
protocols = lmtp
listen = 127.0.0.1
auth_username_format = %Ln
mail_location = maildir:~/Maildir
mail_plugins = quota
plugin {{
  quota = maildir:User quota
}}
passdb {{
  driver = passwd-file
  args = {d}/passwd
}}
userdb {{
  driver = passwd-file
  args = {d}/passwd
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service auth {{
  unix_listener auth-userdb {{
    mode = 0666
  }}
}}
"""


@dataclass
class Dovecot:
    directory: Path
    config: Path
    lmtp_port: int
    process: subprocess.Popen[bytes]

    def maildir(self, user: str) -> list[bytes]:
        """The messages delivered to `user`'s INBOX."""
        new = self.directory / "mail" / user / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


@contextmanager
def dovecot(extra_config: str = "") -> Iterator[Dovecot]:
    """A standalone master: LMTP on a free port, and the auth-userdb socket dovecot-lda needs."""
    binary = require_program("dovecot")
    directory = traversable_tmpdir("dv")
    port = free_port()
    (directory / "mail").mkdir()
    lines = []
    for user, extra in USERS.items():
        home = directory / "mail" / user
        home.mkdir()
        os.chown(home, MAIL_UID, MAIL_GID)
        lines.append(f"{user}:{{PLAIN}}secret:{MAIL_UID}:{MAIL_GID}::{home}::{extra}")
    (directory / "passwd").write_text("\n".join(lines) + "\n")
    config = directory / "dovecot.conf"
    config.write_text(CONFIG.format(d=directory, port=port) + extra_config)
    process = subprocess.Popen([binary, "-F", "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        wait_greeting(port, process)
        yield Dovecot(directory=directory, config=config, lmtp_port=port, process=process)
    finally:
        stop(process)
        shutil.rmtree(directory, ignore_errors=True)
