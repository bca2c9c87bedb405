import sys

from featopt.cli import main

sys.exit(main())
