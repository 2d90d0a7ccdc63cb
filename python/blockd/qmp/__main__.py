"""``python -m blockd.qmp SOCKET COMMAND [ARGUMENTS-JSON]``: run one QMP command and print the reply.

    python -m blockd.qmp /tmp/qmp.sock query-named-block-nodes '{"flat": true}'
    python -m blockd.qmp 127.0.0.1:4444 query-version

SOCKET is a unix socket path or host:port. The reply is printed as indented JSON; the exit status
is 1 if the command failed.
"""

from __future__ import annotations

import json
import sys

from .client import QMPClient


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3) or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if len(args) not in (1,) else sys.stdout)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    arguments = json.loads(args[2]) if len(args) == 3 else None
    with QMPClient(args[0]) as client:
        reply = client.cmd(args[1], arguments)
    print(json.dumps(reply, indent=2))
    return 1 if "error" in reply else 0


if __name__ == "__main__":
    raise SystemExit(main())
