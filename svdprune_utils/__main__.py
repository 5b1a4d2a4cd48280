"""Command line: ``python -m svdprune_utils <command>``.

Commands:
    reproduce [NOTEBOOK ...]   execute the notebooks headlessly on copies (the committed notebooks are
                               not touched); figures land in figures/, executed copies in out/notebooks/.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _reproduce(args: argparse.Namespace) -> int:
    import nbformat
    from nbclient import NotebookClient
    from tqdm.auto import tqdm

    paths = [pathlib.Path(p) for p in args.notebooks] or sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))
    if not paths:
        print("no notebooks found", file=sys.stderr)
        return 2
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"notebook(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MPLBACKEND", "Agg")
    for path in tqdm(paths, desc="notebooks", unit="nb"):
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.resolve().parent)}})
        client.execute()
        target = out_dir / path.name
        nbformat.write(nb, target)
        tqdm.write(f"{path.name}: {time.perf_counter() - start:.0f} s -> {target}")
    print(f"figures in {REPO / 'figures'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svdprune_utils", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="execute the notebooks on copies and write figures/")
    rep.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/[0-9]*.ipynb)")
    rep.add_argument("--out", default=str(REPO / "out" / "notebooks"), help="where executed copies go")
    rep.add_argument("--timeout", type=int, default=1800, help="per-cell timeout in seconds")
    rep.set_defaults(func=_reproduce)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
