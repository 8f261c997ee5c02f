import sys

from hybrid_megatron.cli import main

sys.exit(main())
