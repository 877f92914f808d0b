"""Regenerate the Python stubs from the .proto files: `python -m protos.generate`.

The stubs are committed; tests/test_protos.py checks that regenerating yields the same files."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["protos/drafthorse/v1/drafthorse.proto"]


def generate(out_dir: Path = ROOT) -> list[Path]:
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *[str(ROOT / p) for p in PROTOS]]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / "protos" / "drafthorse" / "v1").glob("drafthorse_pb2*.py*"))


if __name__ == "__main__":
    for p in generate():
        print(p.relative_to(ROOT), file=sys.stderr)
