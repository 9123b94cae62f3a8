import sys

from selfpatch_hf.evaluation.cli import main

sys.exit(main())
