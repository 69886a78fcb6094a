import sys

from recsys.cli.main import main

sys.exit(main())
