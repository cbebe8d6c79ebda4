"""A `custom` relay factory that takes a while, for signals that arrive while relays are built.

Options: `marker`, a file created when the factory is called; `seconds`, how long it then blocks
(as a factory that connects somewhere synchronously would).
"""

import time
from pathlib import Path
from typing import Any

from tests.scripted import ScriptedRelay


def factory(options: dict[str, Any]) -> ScriptedRelay:
    Path(options["marker"]).touch()
    time.sleep(float(options["seconds"]))
    return ScriptedRelay({})
