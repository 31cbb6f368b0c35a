"""`python -m kvzap_trt.cli`: the same as `kvzap-trt`."""

import sys

from kvzap_trt.cli import main

sys.exit(main())
