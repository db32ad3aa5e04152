"""A tiny TCP probe used inside job network namespaces: `serve PORT` or `connect IP PORT`."""

import socket
import sys

if sys.argv[1] == "serve":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2])))
    s.listen(64)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        c.sendall(b"jobnet-ok\n")
        c.close()
else:
    try:
        c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=float(sys.argv[4]))
        data = c.recv(64)
        sys.exit(0 if data == b"jobnet-ok\n" else 3)
    except OSError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
