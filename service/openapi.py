"""The OpenAPI document of the app, as committed in docs/openapi.json.

    python -m service.openapi            # print it
    python -m service.openapi --write    # regenerate docs/openapi.json (tests/unit/test_openapi.py checks it)

Built from create_app() without starting it: no model is loaded, and settings do not change the document.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.app import create_app
from service.settings import Settings

OPENAPI_FILE = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
REGENERATE = "python -m service.openapi --write"


def render() -> str:
    """Stable text: the document as FastAPI builds it, indented, one trailing newline (diff-friendly)."""
    spec = create_app(Settings()).openapi()
    return json.dumps(spec, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.openapi", description=__doc__.splitlines()[0])
    parser.add_argument("--write", nargs="?", const=OPENAPI_FILE, type=Path, metavar="PATH",
                        help=f"write to PATH (default {OPENAPI_FILE.relative_to(OPENAPI_FILE.parents[1])}) "
                             "instead of printing")
    args = parser.parse_args(argv)
    text = render()
    if args.write is None:
        sys.stdout.write(text)
    else:
        args.write.write_text(text)
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
