"""Real servers started by the tests on 127.0.0.1: each a context manager, each in its own thread or process."""
