"""`python -m heron ...`, e.g. under torchrun:

    torchrun --standalone --nproc_per_node 2 -m heron train tiny --set train.parallel=ddp
"""
import sys

from heron.cli.main import main

sys.exit(main())
