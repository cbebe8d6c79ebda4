"""`python -m app` works the same as `mailrelay`."""

import sys

from app.cli import main

sys.exit(main())
