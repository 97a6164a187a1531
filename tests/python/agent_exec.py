"""Connects to the ssh-agent socket, then replaces itself with another
program that signs through the connection it inherited.

Usage: agent_exec.py SOCKET OTHER_PYTHON KEY.pub   (first stage)
       agent_exec.py --fd FD KEY.pub               (second stage, run by exec)
Prints "signed" when the agent answered the signature, "refused" otherwise.
"""

import base64
import os
import socket
import struct
import sys


def frame(payload):
    return struct.pack(">I", len(payload)) + payload


def string(b):
    return struct.pack(">I", len(b)) + b


def read_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise SystemExit("agent closed the connection")
        out += chunk
    return out


def request(sock, payload):
    sock.sendall(frame(payload))
    (length,) = struct.unpack(">I", read_exact(sock, 4))
    if length > 256 * 1024:
        raise SystemExit("answer too long")
    return read_exact(sock, length)


def second_stage(fd, pub):
    sock = socket.socket(fileno=fd)
    sock.settimeout(10)
    with open(pub) as f:
        blob = base64.b64decode(f.read().split()[1])
    # SSH_AGENTC_SIGN_REQUEST: key blob, data, flags.
    answer = request(sock, bytes([13]) + string(blob) + string(b"exec test") + struct.pack(">I", 0))
    print("signed" if answer[0] == 14 else "refused")


def main():
    if sys.argv[1] == "--fd":
        second_stage(int(sys.argv[2]), sys.argv[3])
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(sys.argv[1])
    # One request answered means keyholderd has accepted the connection
    # (and read who made it) before this process becomes another program.
    request(sock, bytes([11]))  # SSH_AGENTC_REQUEST_IDENTITIES
    fd = sock.detach()
    os.set_inheritable(fd, True)
    other = sys.argv[2]
    os.execv(other, [other, os.path.abspath(__file__), "--fd", str(fd), sys.argv[3]])


if __name__ == "__main__":
    main()
