"""Container HEALTHCHECK: exit 0 when the gateway's /healthz answers 200, 1 otherwise.

Slim images have no curl; this needs nothing but the standard library. Liveness only
(/healthz): a Redis outage makes /readyz 503 but must not get the container restarted.
Proxies are bypassed on purpose: an HTTP(S)_PROXY set for egress must not capture loopback.

    GATEWAY_HEALTHCHECK_URL   default http://127.0.0.1:8000/healthz
    GATEWAY_HEALTHCHECK_TIMEOUT_S   default 2
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = os.environ.get("GATEWAY_HEALTHCHECK_URL", "http://127.0.0.1:8000/healthz")
    timeout = float(os.environ.get("GATEWAY_HEALTHCHECK_TIMEOUT_S", "2"))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:  # refused, timed out, bad URL
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
