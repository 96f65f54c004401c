import sys

from .supervise import entry

sys.exit(entry())
