import sys

from distinf.cli import main

sys.exit(main())
