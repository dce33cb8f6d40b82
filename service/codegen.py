"""Regenerate (or check) the Python code generated from ``service/v1/retrieval.proto``.

The generated ``retrieval_pb2.py``, ``retrieval_pb2.pyi`` and ``retrieval_pb2_grpc.py`` are
committed, so installing retromem needs no protoc; ``python -m retromem.service.codegen`` rewrites them after
an edit of the ``.proto`` and ``python -m retromem.service.codegen --check`` (run by the tests) fails when
they are stale. The protoc is grpcio-tools'; its protobuf version sets the runtime floor in
pyproject.toml.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO = Path("service/v1/retrieval.proto")
NAMESPACE = "retromem"
OUTPUTS = ("retrieval_pb2.py", "retrieval_pb2.pyi", "retrieval_pb2_grpc.py")


def generate(out_root: Path) -> dict[str, bytes]:
    """Run protoc on the .proto into ``out_root``; the generated files' bytes by name."""
    from grpc_tools import protoc

    # protoc names the generated modules after the .proto's path under -I, so the .proto is
    # staged at its import path, retromem/service/v1/: the gRPC module then imports
    # `retromem.service.v1.retrieval_pb2` whatever the folder layout of the repository.
    staged = out_root / "proto" / NAMESPACE / PROTO
    staged.parent.mkdir(parents=True)
    staged.write_bytes((REPO / PROTO).read_bytes())
    rc = protoc.main(["grpc_tools.protoc", f"-I{out_root / 'proto'}", f"--python_out={out_root}",
                      f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", str(staged)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
    return {name: (out_root / NAMESPACE / PROTO.parent / name).read_bytes() for name in OUTPUTS}


def stale() -> list[str]:
    """Generated files that differ from what protoc makes of the .proto now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    here = REPO / PROTO.parent
    return [n for n, data in fresh.items() if not (here / n).is_file() or (here / n).read_bytes() != data]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed files are stale")
    args = ap.parse_args(argv)
    bad = stale()
    if args.check:
        if bad:
            print(f"stale generated code: {', '.join(bad)}; run `python -m retromem.service.codegen`", file=sys.stderr)
            return 1
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in generate(Path(tmp)).items():
            (REPO / PROTO.parent / name).write_bytes(data)
    print(f"wrote {', '.join(OUTPUTS)} in {PROTO.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
