#!/usr/bin/env python3
"""A Keyholder client in Python, using only grpcio and stubs generated from proto/.

Usage: client.py SOCKET PIN_FILE STUBS_DIR
Prints one JSON object describing what it saw; the Rust test checks it.
"""
import json
import sys

socket_path, pin_file, stubs = sys.argv[1:4]
sys.path.insert(0, stubs)

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from keyholder.v1 import keyholder_pb2 as pb  # noqa: E402
from keyholder.v1 import keyholder_pb2_grpc as rpc  # noqa: E402

result = {}
# grpc-core sends the socket path as :authority, which the HTTP/2 server
# rejects as malformed; name any plain host instead.
with grpc.insecure_channel("unix:" + socket_path, options=[("grpc.default_authority", "localhost")]) as channel:
    session = rpc.SessionStub(channel)
    secrets = rpc.SecretsStub(channel)

    result["state_before"] = pb.SessionState.Name(session.Status(pb.StatusRequest()).state)
    try:
        secrets.Get(pb.GetSecretRequest(name="py/secret"))
    except grpc.RpcError as e:
        result["locked_code"] = e.code().name
        result["locked_message"] = e.details()

    with open(pin_file) as f:
        pin = f.readline().strip()
    unlocked = session.Unlock(pb.UnlockRequest(pin=pin))
    result["state_after"] = pb.SessionState.Name(unlocked.status.state)

    put = secrets.Put(pb.PutSecretRequest(name="py/secret", value=b"from python"))
    result["generation"] = put.generation
    result["value"] = secrets.Get(pb.GetSecretRequest(name="py/secret")).value.decode()
    result["listed"] = [m.name for m in secrets.List(pb.ListSecretsRequest(prefix="py/")).secrets]

    for key, request in [
        ("bad_name", pb.PutSecretRequest(name="a/../b", value=b"x")),
        ("too_big", pb.PutSecretRequest(name="big", value=b"x" * (70 * 1024))),
        ("exists", pb.PutSecretRequest(name="py/secret", value=b"again")),
    ]:
        try:
            secrets.Put(request)
            result[key] = "OK"
        except grpc.RpcError as e:
            result[key] = e.code().name
            result[key + "_message"] = e.details()
    try:
        secrets.Get(pb.GetSecretRequest(name="py/missing"))
    except grpc.RpcError as e:
        result["missing"] = e.code().name

    health = health_pb2_grpc.HealthStub(channel)
    result["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
        health.Check(health_pb2.HealthCheckRequest(service="keyholder.v1.Secrets")).status
    )
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    result["services"] = sorted(s.name for r in replies for s in r.list_services_response.service)

print(json.dumps(result))
