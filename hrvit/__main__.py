import sys

from hrvit.cli import main

sys.exit(main())
