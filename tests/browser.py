"""Debian's Chromium driven by Playwright, for the tests (and bench/explorer.py) that use the explorer as a person
does. The system browser is launched by path (Playwright's own browser downloads are never used), headless,
with the background services that would try to reach the internet turned off."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("FEATUREWIRE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (make venv installs it)"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (make browser-tools installs Debian's chromium; or set FEATUREWIRE_CHROMIUM)"
    return None


def launch(playwright: Any) -> Any:
    """A headless Chromium browser."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
