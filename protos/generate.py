"""Regenerate the Python stubs from the .proto files: `python -m drafthorse.protos.generate`.

The stubs are committed; tests/test_layers.py checks that regenerating yields the same files."""
from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["protos/drafthorse/v1/drafthorse.proto"]
# protoc names modules by the .proto's path under the include root (protos.drafthorse.v1); the package is
# installed as drafthorse.protos, so the stubs import each other by that name. The .proto's own path (and
# so the descriptor every reflection client sees) stays protos/drafthorse/v1/drafthorse.proto.
IMPORT_FROM, IMPORT_TO = "from protos.drafthorse.", "from drafthorse.protos.drafthorse."


def generate(out_dir: Path = ROOT) -> list[Path]:
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *[str(ROOT / p) for p in PROTOS]]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    stubs = sorted((out_dir / "protos" / "drafthorse" / "v1").glob("drafthorse_pb2*.py*"))
    for p in stubs:
        p.write_text(p.read_text().replace(IMPORT_FROM, IMPORT_TO))
    return stubs


if __name__ == "__main__":
    for p in generate():
        print(p.relative_to(ROOT), file=sys.stderr)
