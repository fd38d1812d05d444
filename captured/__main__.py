import sys

from captured.service.cli import main

if __name__ == "__main__":  # not in a worker process `captured read` spawns
    sys.exit(main())
