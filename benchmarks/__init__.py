"""astral's benchmark suite: ``python -m benchmarks --help``.

Layout:

- ``__main__``   the command line;
- ``harness``    child processes, interleaved repetitions, statistics, table, JSON;
- ``child``      the entry point of every server and client process;
- ``workloads``  what a client process measures (A-F) and the server's side of it;
- ``common``     the shared vocabulary: payload, capabilities, system interface;
- ``systems/``   one module per family of systems under test;
- ``codec``      a micro-benchmark of JSON codecs on a typical frame.

See ``benchmarks/README.md`` for what each figure means.
"""
