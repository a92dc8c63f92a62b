import sys

from deepfleet.cli.main import main

sys.exit(main())
