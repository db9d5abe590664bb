"""``python -m models build NAME`` / ``python -m models list``."""

from __future__ import annotations

import argparse
import sys

from models.cache import ALL, BUILDERS, build, cache_root, is_up_to_date, model_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models", description="Build the reference models into a local cache."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a model into the cache (skipped when up to date)")
    b.add_argument("name", choices=[*BUILDERS, "all"], help=f"'all' means {', '.join(ALL)}")
    b.add_argument(
        "--cache",
        help="cache root; the model goes to CACHE/NAME/ (default: $ONNXLR_MODEL_CACHE "
        "or <repo>/.cache/models)",
    )
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    ls = sub.add_parser("list", help="list the models and whether they are built")
    ls.add_argument("--cache", help="cache root (as for build)")
    return parser


def _list(cache: str | None) -> None:
    print(f"cache: {cache_root(cache)}")
    for name, builder in BUILDERS.items():
        state = "built" if is_up_to_date(model_dir(name, cache), name, builder.version) else "not built"
        print(f"  {name:<12} {state:<10} {builder.description}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        _list(args.cache)
        return 0
    names = ALL if args.name == "all" else (args.name,)
    for name in names:
        build(name, cache=args.cache, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
