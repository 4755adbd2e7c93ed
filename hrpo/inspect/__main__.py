import sys

from hrpo.inspect.cli import main

sys.exit(main())
