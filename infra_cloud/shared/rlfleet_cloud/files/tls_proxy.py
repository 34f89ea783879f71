"""TLS front for Ray's dashboard / Jobs API on the head (stdlib only).

Ray's dashboard has no TLS of its own, so it listens on 127.0.0.1:8265 and this proxy
terminates TLS (1.2+) on the API port with the certificate the bootstrap generated. Ray's
token auth still applies to every request: the proxy passes bytes through unchanged.

    python tls_proxy.py --listen 0.0.0.0:8443 --upstream 127.0.0.1:8265 --cert C --key K
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(listen: str, upstream: str, cert: str, key: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    up_host, up_port = _split(upstream)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(up_host, up_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    host, port = _split(listen)
    server = await asyncio.start_server(handle, host, port, ssl=ctx)
    async with server:
        print(f"tls_proxy: listening on {listen} -> {upstream}", flush=True)
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    args = ap.parse_args()
    asyncio.run(serve(args.listen, args.upstream, args.cert, args.key))


if __name__ == "__main__":
    main()
