import sys

from bdvae.cli import main

sys.exit(main())
