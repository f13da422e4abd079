import sys

from koopfast.cli import main

sys.exit(main())
