"""gzip standard input to standard output: ``python gzip_child.py LEVEL NAME MTIME``.

The background compression of :mod:`recsys.linelog.files` runs this in a child process at the
lowest CPU priority, so that it shares no interpreter lock with the serving threads. It is run
by path and imports only the standard library (none of recsys, none of site-packages: the
interpreter starts in milliseconds). Its output is byte for byte what
``gzip.GzipFile(filename=NAME, mtime=MTIME, compresslevel=LEVEL)`` writes in process: the same
zlib as the server's own compression (GNU gzip's ``-1`` took 1.45x the CPU on exposure
records, benchmarks/README.md, "Twenty-first round")."""

import gzip
import shutil
import sys

CHUNK_BYTES = 1 << 20


def main() -> None:
    level, name, mtime = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    with gzip.GzipFile(
        filename=name, mode="wb", fileobj=sys.stdout.buffer, compresslevel=level, mtime=mtime
    ) as out:
        shutil.copyfileobj(sys.stdin.buffer, out, CHUNK_BYTES)


if __name__ == "__main__":
    main()
