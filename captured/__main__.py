import sys

from captured.service.cli import main

sys.exit(main())
