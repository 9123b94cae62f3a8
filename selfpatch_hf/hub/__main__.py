import sys

from selfpatch_hf.hub.cli import main

sys.exit(main())
