from __future__ import annotations

import subprocess
import sys


def test_client_package_imports_without_torch():
    code = "import sys, featurewire; assert featurewire.__version__; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
