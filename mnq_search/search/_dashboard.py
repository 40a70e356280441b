"""``mnq-search dashboard``: optuna-dashboard on 127.0.0.1, on a free port, for a study storage.

The dashboard's WSGI application (``optuna_dashboard.wsgi``) is served by the standard library's
threaded ``wsgiref`` server bound to loopback; port 0 lets the system pick a free port, and the
address is printed (one line, ``http://127.0.0.1:PORT``) once the socket listens. The JSON API
lists the studies at ``/api/studies``.
"""

from __future__ import annotations

import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..errors import UsageError

HOST = "127.0.0.1"


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


def make_dashboard_server(storage_url: str, port: int = 0) -> WSGIServer:
    """A dashboard server for ``storage_url`` listening on 127.0.0.1:``port`` (0: a free port);
    call ``serve_forever()`` on it. The port is ``server.server_port``."""
    try:
        import optuna_dashboard
    except ImportError:
        raise UsageError("the dashboard needs optuna-dashboard: pip install 'mnq-search[dashboard]'") from None
    from ._storage import open_storage

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    app = optuna_dashboard.wsgi(open_storage(storage_url, create=False))
    try:
        return make_server(HOST, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise UsageError(f"cannot listen on {HOST}:{port}: {exc.strerror or exc}") from None


def serve_dashboard(storage_url: str, port: int = 0) -> None:
    """Serve until interrupted; prints the address first."""
    server = make_dashboard_server(storage_url, port)
    print(f"http://{HOST}:{server.server_port}", flush=True)
    print("serving the optuna dashboard; Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
