import sys

from hyla.cli import main

sys.exit(main())
