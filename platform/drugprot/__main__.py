import sys

from drugprot.cli import main

sys.exit(main())
