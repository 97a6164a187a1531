#!/usr/bin/env python3
"""Holds one TLS connection to keyholderd's TCP listener across a lock.

Usage: tcp_hold.py HOST:PORT SERVER_CA CERT KEY STUBS_DIR READY_FILE GO_FILE
Calls Status, writes READY_FILE, waits (at most 60 s) for GO_FILE, calls
Status again on the same channel, and prints both outcomes as JSON.
"""
import json
import os
import sys
import time

target, server_ca, cert, key, stubs, ready, go = sys.argv[1:8]
sys.path.insert(0, stubs)

import grpc  # noqa: E402
from keyholder.v1 import keyholder_pb2 as pb  # noqa: E402
from keyholder.v1 import keyholder_pb2_grpc as rpc  # noqa: E402


def read(path):
    with open(path, "rb") as f:
        return f.read()


credentials = grpc.ssl_channel_credentials(read(server_ca), read(key), read(cert))
result = {}
with grpc.secure_channel(
    target, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
) as channel:
    session = rpc.SessionStub(channel)

    def status(name):
        try:
            session.Status(pb.StatusRequest(), timeout=30)
            result[name] = "OK"
        except grpc.RpcError as e:
            result[name] = e.code().name
            result[name + "_message"] = e.details()

    status("before")
    with open(ready, "w") as f:
        f.write("ready")
    deadline = time.time() + 60
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.1)
    status("after")
print(json.dumps(result))
