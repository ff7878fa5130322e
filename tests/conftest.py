"""Makes `harness` (the live-run driver of the chaos, overload and fuzz suites) importable."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
