"""The demo and its stand-ins, not the node's serving path.

- ``node.demo.run``: ``ptx-node demo`` (what ``scripts/demo.sh`` runs);
- ``node.demo.pacs``: a local Orthanc launcher for the demo, the tests and the benchmarks;
- ``node.demo.receiver``: a bare C-STORE receiver standing in for a PACS when Orthanc
  is not installed.

Nothing under ``node.demo`` is imported by ``serve`` or ``worker``.
"""
