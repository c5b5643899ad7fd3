"""Generate the Python stubs for protos/ into kiln_client.proto, or check they are fresh.

The stubs are committed so that clients need no code generation. `python -m
kiln_client.protogen` rewrites them; `--check` exits non-zero when the committed files
differ from what protos/ generates now (`make check-protos`, part of `make test`).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE_DIR = Path(__file__).resolve().parent / "proto"
PACKAGE_IMPORT = "kiln_client.proto"


def proto_files() -> list[Path]:
    """Every .proto below protos/, sorted so output is stable."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Run protoc (python, grpc and mypy stubs) into out_dir and make imports package-local."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    include = Path(protoc.__file__).resolve().parent / "_proto"
    scripts = Path(sys.executable).parent  # mypy-protobuf's plugins live beside python
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    for path in out_dir.rglob("*.py*"):
        text = path.read_text()
        # protoc emits absolute imports rooted at protos/ ("from kiln.v1 import ...").
        text = re.sub(r"^from kiln\.", f"from {PACKAGE_IMPORT}.kiln.", text, flags=re.M)
        text = re.sub(r"^import kiln\.", f"import {PACKAGE_IMPORT}.kiln.", text, flags=re.M)
        path.write_text(text)
    for directory in [out_dir, *[d for d in out_dir.rglob("*") if d.is_dir()]]:
        (directory / "__init__.py").touch()


def differences(expected: Path, actual: Path) -> list[str]:
    """Relative paths that differ, are missing, or are extra between two stub trees."""
    diffs: list[str] = []
    expected_files = {p.relative_to(expected) for p in expected.rglob("*") if p.is_file()}
    actual_files = {
        p.relative_to(actual)
        for p in actual.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    for rel in sorted(expected_files | actual_files):
        present = rel in actual_files and rel in expected_files
        if not present or not filecmp.cmp(expected / rel, actual / rel, shallow=False):
            diffs.append(str(rel))
    return diffs


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m kiln_client.protogen [--check]`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail if the committed stubs are stale"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        if args.check:
            stale = differences(out, PACKAGE_DIR)
            if stale:
                print(
                    "Generated stubs are stale against protos/: "
                    + ", ".join(stale)
                    + ". Run `make protos` and commit the result.",
                    file=sys.stderr,
                )
                return 1
            print("stubs are up to date with protos/")
            return 0
        import shutil

        if PACKAGE_DIR.exists():
            shutil.rmtree(PACKAGE_DIR)
        shutil.copytree(out, PACKAGE_DIR)
        print(f"wrote stubs to {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
