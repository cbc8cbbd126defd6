import sys

from dsq.cli import main

sys.exit(main())
