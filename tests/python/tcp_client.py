#!/usr/bin/env python3
"""A remote admin tool: Python grpcio over TLS with a Keyholder client certificate.

Usage: tcp_client.py HOST:PORT SERVER_CA CERT KEY STUBS_DIR KUBECONFIG_OUT
Prints one JSON object with what each call returned (gRPC code names).
"""
import json
import sys

target, server_ca, cert, key, stubs, kubeconfig_out = sys.argv[1:7]
sys.path.insert(0, stubs)

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from keyholder.v1 import keyholder_pb2 as pb  # noqa: E402
from keyholder.v1 import keyholder_pb2_grpc as rpc  # noqa: E402


def read(path):
    with open(path, "rb") as f:
        return f.read()


credentials = grpc.ssl_channel_credentials(
    root_certificates=read(server_ca),
    private_key=read(key),
    certificate_chain=read(cert),
)
result = {}
# The listener's certificate names localhost and 127.0.0.1.
with grpc.secure_channel(
    target, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
) as channel:
    def call(name, f):
        try:
            f()
            result[name] = "OK"
        except grpc.RpcError as e:
            result[name] = e.code().name
            result[name + "_message"] = e.details()

    def kubeconfig():
        r = rpc.CredentialsStub(channel).IssueKubeconfig(
            pb.IssueKubeconfigRequest(cluster="prod", user="ci", ttl_seconds=600), timeout=30
        )
        with open(kubeconfig_out, "w") as f:
            f.write(r.kubeconfig)

    def health():
        r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        result["health_status"] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    call("health", health)
    call("kubeconfig", kubeconfig)
    call("kubeconfig_admin", lambda: rpc.CredentialsStub(channel).IssueKubeconfig(
        pb.IssueKubeconfigRequest(cluster="prod", user="admin", ttl_seconds=600), timeout=30))
    call("secret", lambda: rpc.SecretsStub(channel).Get(pb.GetSecretRequest(name="db/prod"), timeout=30))
    call("unlock", lambda: rpc.SessionStub(channel).Unlock(pb.UnlockRequest(pin="123456"), timeout=30))
    call("lock", lambda: rpc.SessionStub(channel).Lock(pb.LockRequest(), timeout=30))
    call("set_policy", lambda: rpc.TrustStub(channel).SetPolicy(pb.SetPolicyRequest(policy_toml=""), timeout=30))
print(json.dumps(result))
