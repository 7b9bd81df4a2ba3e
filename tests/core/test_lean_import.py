"""The core layer must stay usable without Lightning (layering: core <- plugins <- callbacks <- cli)."""

import subprocess
import sys


def test_importing_core_does_not_import_lightning():
    code = (
        "import sys, lichtenberg.core, lichtenberg.core.averaging;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
