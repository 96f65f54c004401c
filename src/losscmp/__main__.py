import sys

from .supervise import entry

if __name__ == "__main__":  # not when multiprocessing re-imports the main module in a worker
    sys.exit(entry())
