"""Exit 0 when the metasent server is healthy (used by Docker HEALTHCHECK and compose; the slim
image has no curl).

    metasent-healthcheck            # /healthz answers status ok (liveness: the model is loaded)
    metasent-healthcheck /readyz    # /readyz answers 200 ready (the store takes writes too)
"""

import json
import os
import sys
import urllib.request

path = sys.argv[1] if len(sys.argv) > 1 else "/healthz"
url = f"http://127.0.0.1:{os.environ.get('METASENT_PORT', '8000')}{path}"
try:
    with urllib.request.urlopen(url, timeout=5) as response:  # a 503 raises
        sys.exit(0 if json.load(response).get("status") in {"ok", "ready"} else 1)
except Exception:  # noqa: BLE001 - any failure means unhealthy
    sys.exit(1)
