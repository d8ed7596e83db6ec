import sys

from medsecure.cli import main

sys.exit(main())
