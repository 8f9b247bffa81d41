import sys

from loopmoe.cli.main import main

sys.exit(main())
