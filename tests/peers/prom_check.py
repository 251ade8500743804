#!/usr/bin/env python3
"""Scrapes a Prometheus endpoint and parses it with the reference parsers of `prometheus_client`.

    prom_check.py URL [--openmetrics]

Fetches URL (plain Prometheus text, or with --openmetrics the OpenMetrics format, asked for with
`Accept: application/openmetrics-text`) and parses the body with
`prometheus_client.parser.text_string_to_metric_families` or, with --openmetrics,
`prometheus_client.openmetrics.parser.text_string_to_metric_families`, which is strict about
the format (`# EOF`, counter samples ending in `_total`, families not interleaved...).

Prints one JSON object on stdout:

  {"content_type": "...", "families": [{"name": "...", "type": "counter", "help": "...",
   "samples": [{"name": "..._total", "labels": {...}, "value": 1.0}, ...]}, ...]}

Exit codes: 0 parsed; 2 the request failed (status other than 200 included); 3 the body does not
parse (the parser's error is printed as {"error": "..."}).
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("url", help="e.g. http://127.0.0.1:15020/metrics")
    p.add_argument("--openmetrics", action="store_true", help="ask for and parse OpenMetrics")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()

    accept = (
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
        if args.openmetrics
        else "text/plain; version=0.0.4"
    )
    # No proxy from the environment: the endpoint is local to the namespace.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(args.url, headers={"Accept": accept})
    try:
        with opener.open(req, timeout=args.timeout) as resp:
            body = resp.read().decode("utf-8")
            ctype = resp.headers.get("Content-Type", "")
    except (urllib.error.URLError, OSError) as e:
        print(json.dumps({"error": f"GET {args.url}: {e!r}"}))
        sys.exit(2)

    parse = openmetrics_families if args.openmetrics else text_string_to_metric_families
    try:
        families = [
            {
                "name": f.name,
                "type": f.type,
                "help": f.documentation,
                "samples": [
                    {"name": s.name, "labels": dict(s.labels), "value": s.value}
                    for s in f.samples
                ],
            }
            for f in parse(body)
        ]
    except Exception as e:  # noqa: BLE001 - any parser complaint is the finding
        print(json.dumps({"error": f"parse: {e!r}", "content_type": ctype, "body": body}))
        sys.exit(3)
    print(json.dumps({"content_type": ctype, "families": families}))


if __name__ == "__main__":
    main()
