"""How to install a missing package, phrased for where the user is.

The Slicer module starts its model server with ``MED3DVLM_HOST=slicer``: there, packages go into
Slicer's own Python through ``slicer.util.pip_install``; elsewhere through pip.
"""

from __future__ import annotations

import os

HOST_ENV = "MED3DVLM_HOST"


def install_hint(*requirements: str) -> str:
    spec = " ".join(requirements)
    if os.environ.get(HOST_ENV) == "slicer":
        return f"install {'it' if len(requirements) == 1 else 'them'} in Slicer's Python console with " \
               f"slicer.util.pip_install({spec!r}) and restart Slicer"
    return "pip install " + " ".join(f"'{r}'" if any(c in r for c in "<>=[") else r for r in requirements)
