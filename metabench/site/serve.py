"""Serves a built site on localhost; every response also carries the pages'
Content-Security-Policy as a header, so a served JSON or CSV file cannot run script either."""

from __future__ import annotations

import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from metabench.site.pages import CSP

__all__ = ["make_server", "serve"]


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map,
                      ".html": "text/html; charset=utf-8", ".json": "application/json",
                      ".csv": "text/csv; charset=utf-8", ".svg": "image/svg+xml"}

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()


def make_server(site_dir: Path = Path("leaderboard/site"), port: int = 8000,
                host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """An HTTP server for the built site (port 0 picks a free port); call ``serve_forever``."""
    site = Path(site_dir)
    if not (site / "index.html").is_file():
        raise FileNotFoundError(f"no site at {site} (no index.html); run "
                                "`metabench leaderboard build` first")
    handler = functools.partial(_Handler, directory=str(site))
    return ThreadingHTTPServer((host, port), handler)


def serve(site_dir: Path = Path("leaderboard/site"), port: int = 8000,
          host: str = "127.0.0.1") -> None:
    """Serves the built site on ``http://host:port/`` until interrupted."""
    server = make_server(site_dir, port, host)
    h, p = server.server_address[:2]
    print(f"serving {site_dir} at http://{h}:{p}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
