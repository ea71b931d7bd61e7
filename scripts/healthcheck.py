"""Exit 0 when the metasent server answers /healthz with status ok (used by Docker HEALTHCHECK
and compose; the slim image has no curl)."""

import json
import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('METASENT_PORT', '8000')}/healthz"
try:
    with urllib.request.urlopen(url, timeout=5) as response:
        sys.exit(0 if json.load(response).get("status") == "ok" else 1)
except Exception:  # noqa: BLE001 - any failure means unhealthy
    sys.exit(1)
