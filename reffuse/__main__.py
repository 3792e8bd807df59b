import sys

from reffuse.cli import main

sys.exit(main())
