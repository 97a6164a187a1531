#!/usr/bin/env python3
"""Ask keyholderd for a short-lived kubeconfig and write it with mode 0600.

Needs grpcio and stubs generated from Keyholder's proto/ on PYTHONPATH:

    pip install grpcio grpcio-tools
    python3 -m grpc_tools.protoc -I proto --python_out=stubs --grpc_python_out=stubs \\
        proto/keyholder/v1/keyholder.proto
    PYTHONPATH=stubs examples/kubeconfig.py --cluster prod --user ci-deployer --out prod.kubeconfig
"""
import argparse
import datetime
import os
import socket
import struct
import sys

import grpc
from keyholder.v1 import keyholder_pb2 as pb
from keyholder.v1 import keyholder_pb2_grpc as rpc


def default_socket():
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/keyholder-{os.getuid()}"
    return os.path.join(runtime, "keyholder", "keyholder.sock")


def check_socket(path):
    """Refuse a socket that is not ours before sending it a byte.

    Without XDG_RUNTIME_DIR the socket lives under /tmp, where another local
    user could create the directory first and listen there. The directory must
    be ours and not writable by group or others (then nobody else can replace
    the socket), and the process listening on it must run as us or as root.
    """
    uid = os.getuid()
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except OSError as e:
        sys.exit(f"keyholder: cannot reach keyholderd at {path}: {e}")
    if st.st_uid != uid:
        sys.exit(f"keyholder: refusing to use {path}: its directory {directory} belongs to uid {st.st_uid}, "
                 f"not to you (uid {uid}); nothing was sent")
    if st.st_mode & 0o022:
        sys.exit(f"keyholder: refusing to use {path}: its directory {directory} is writable by group or others "
                 f"(mode {st.st_mode & 0o7777:04o}); nothing was sent")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as e:
        sys.exit(f"keyholder: cannot reach keyholderd at {path}: {e}")
    finally:
        probe.close()
    _pid, peer_uid, _gid = struct.unpack("3i", creds)
    if peer_uid not in (uid, 0):
        sys.exit(f"keyholder: refusing to use {path}: the process listening on it runs as uid {peer_uid}, "
                 f"not as you (uid {uid}) or root; nothing was sent")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", default=os.environ.get("KEYHOLDER_SOCKET") or default_socket())
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--group", action="append", default=[], help="Kubernetes group (repeatable)")
    ap.add_argument("--ttl", type=int, default=0, help="seconds; 0 means the daemon's default (15 minutes)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    check_socket(args.socket)
    # grpc-core would send the socket path as the HTTP/2 :authority, which the
    # daemon's HTTP/2 stack rejects; name a plain host instead.
    options = [("grpc.default_authority", "localhost")]
    with grpc.insecure_channel("unix:" + args.socket, options=options) as channel:
        creds = rpc.CredentialsStub(channel)
        try:
            resp = creds.IssueKubeconfig(
                pb.IssueKubeconfigRequest(
                    cluster=args.cluster, user=args.user, groups=args.group, ttl_seconds=args.ttl
                ),
                timeout=30,
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                sys.exit(f"keyholder: {e.details()}")
            sys.exit(f"keyholder: {e.code().name}: {e.details()}")

    # Create the file 0600 from the start: the kubeconfig holds a private key.
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(resp.kubeconfig)
    os.chmod(args.out, 0o600)
    expires = datetime.datetime.fromtimestamp(resp.expires_at.seconds, datetime.timezone.utc)
    print(f"wrote {args.out}; the credential expires {expires.isoformat()}")


if __name__ == "__main__":
    main()
