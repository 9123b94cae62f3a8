import sys

from selfpatch_hf.conversion.cli import main

sys.exit(main())
