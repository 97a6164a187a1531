#!/usr/bin/env python3
"""Scrapes keyholderd's metrics endpoint and parses it with prometheus_client's
text-format parser (which refuses anything the format does not allow).

Usage: scrape.py URL
Prints {"family name": [[{labels}, value], ...], ...} as JSON.
"""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

url = sys.argv[1]
with urllib.request.urlopen(url, timeout=10) as r:
    content_type = r.headers.get("Content-Type", "")
    text = r.read().decode("utf-8")
out = {"_content_type": content_type}
for family in text_string_to_metric_families(text):
    out[family.name + ":" + family.type] = [[s.labels, s.value] for s in family.samples]
print(json.dumps(out))
