"""Regenerate the protobuf/gRPC bindings in offbeat/v1 from proto/offbeat/v1/*.proto.

`python scripts/gen_proto.py` writes them; `--check` exits 1 if the committed ones are stale.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = ROOT / "offbeat" / "v1"
INIT = '"""Generated protobuf bindings for the offbeat.v1 contracts (see proto/; `make proto`)."""\n'


def generate(out_root: Path) -> Path:
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "offbeat" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={Path(sys.executable).parent / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = out_root / "offbeat" / "v1"
    for name in list(package.glob("*_pb2_grpc.py")):
        if "def add_" not in name.read_text() and "class " not in name.read_text():
            name.unlink()  # messages-only protos get an empty grpc module
    (package / "__init__.py").write_text(INIT)
    return package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed bindings are stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        names = sorted(p.name for p in fresh.iterdir() if p.is_file())
        if check:
            current = (
                sorted(p.name for p in OUT_PACKAGE.iterdir() if p.is_file()) if OUT_PACKAGE.exists() else []
            )
            stale = [
                n
                for n in names
                if n not in current or not filecmp.cmp(fresh / n, OUT_PACKAGE / n, shallow=False)
            ]
            stale += [n for n in current if n not in names]
            if stale:
                print(f"stale bindings: {', '.join(stale)}; run `make proto`", file=sys.stderr)
                raise SystemExit(1)
            return
        if OUT_PACKAGE.exists():
            shutil.rmtree(OUT_PACKAGE)
        OUT_PACKAGE.mkdir(parents=True)
        for n in names:
            shutil.copy2(fresh / n, OUT_PACKAGE / n)
        print(f"wrote {len(names)} files to {OUT_PACKAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
