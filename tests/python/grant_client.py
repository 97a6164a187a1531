#!/usr/bin/env python3
"""A script holding a Keyholder grant: one request with the bearer token.

Usage: grant_client.py SOCKET STUBS_DIR TOKEN OP [ARGS...]
  OP kubeconfig CLUSTER USER TTL_SECONDS OUT_FILE
  OP secret NAME
Prints one JSON object: {"code": "OK" or the gRPC code, "message": ...}.
"""
import json
import sys

socket_path, stubs, token, op = sys.argv[1:5]
args = sys.argv[5:]
sys.path.insert(0, stubs)

import grpc  # noqa: E402
from keyholder.v1 import keyholder_pb2 as pb  # noqa: E402
from keyholder.v1 import keyholder_pb2_grpc as rpc  # noqa: E402

metadata = [("authorization", "Bearer " + token)] if token else []
result = {"code": "OK", "message": ""}
with grpc.insecure_channel(
    "unix:" + socket_path, options=[("grpc.default_authority", "localhost")]
) as channel:
    try:
        if op == "kubeconfig":
            cluster, user, ttl, out = args
            r = rpc.CredentialsStub(channel).IssueKubeconfig(
                pb.IssueKubeconfigRequest(cluster=cluster, user=user, ttl_seconds=int(ttl)),
                metadata=metadata,
                timeout=30,
            )
            with open(out, "w") as f:
                f.write(r.kubeconfig)
        elif op == "secret":
            r = rpc.SecretsStub(channel).Get(
                pb.GetSecretRequest(name=args[0]), metadata=metadata, timeout=30
            )
            result["value_len"] = len(r.value)
        else:
            raise SystemExit("unknown op " + op)
    except grpc.RpcError as e:
        result["code"] = e.code().name
        result["message"] = e.details()
print(json.dumps(result))
