import sys

from csi.cli import main

sys.exit(main())
