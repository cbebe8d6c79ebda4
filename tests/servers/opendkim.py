"""OpenDKIM's verifier (`opendkim -t`, no milter), resolving through a given nameserver."""

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers.process import require_program, traversable_tmpdir


@dataclass(frozen=True)
class Verification:
    passed: bool
    line: str  # opendkim's own words, e.g. "... verification (s=ed, d=dkim.test, 0-bit key) succeeded"


@dataclass(frozen=True)
class OpenDkim:
    program: str
    config: Path

    def verify(self, message: bytes) -> Verification:
        """Verifies the message's first DKIM signature, looking the key up in DNS."""
        done = subprocess.run(  # noqa: S603
            [self.program, "-x", str(self.config), "-t", "-"], input=message, capture_output=True, timeout=30
        )
        # opendkim exits 0 whether the signature verified or not; its verdict is on stdout.
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        line = done.stdout.decode(errors="replace").strip()
        return Verification(line.endswith(" succeeded"), line)


@contextmanager
def opendkim_verifier(nameserver: str) -> Iterator[OpenDkim]:
    """`nameserver` is `host@port`. opendkim resolves through libunbound; `local-zone: "test."
    nodefault` lets unbound forward the .test names it would otherwise answer itself."""
    program = require_program("opendkim", "/usr/sbin/opendkim")
    directory = traversable_tmpdir("opendkim-")
    try:
        (directory / "unbound.conf").write_text(
            f'server:\n    local-zone: "test." nodefault\nforward-zone:\n    name: "."\n    forward-addr: {nameserver}\n'
        )
        config = directory / "opendkim.conf"
        config.write_text(f"Mode v\nSyslog no\nResolverConfiguration {directory / 'unbound.conf'}\n")
        yield OpenDkim(program, config)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
