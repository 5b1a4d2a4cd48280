"""Command line: ``python -m svdprune_utils <command>``.

Commands:
    demo         the embedded model answers a few ShapesVQA questions at 576/64/16 tokens for three
                 methods; prints the table and saves a kept-token overlay figure.
    eval         accuracy vs budget for methods × budgets on ShapesVQA (default) or a real VQA set
                 (``--dataset`` local JSON or Hugging Face id), as a table (``--out`` CSV).
    train-tiny   retrain the embedded tiny LLaVA from scratch (CPU by default).
    testbed-check  does accuracy under pruning measure the selection on a model? (five properties, PASS/FAIL)
    reproduce    execute the notebooks headlessly on copies (the committed notebooks are not touched);
                 figures land in figures/, executed copies in out/notebooks/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import re
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _final_progress(text: str) -> str:
    """A stream's text with every progress bar (tqdm's carriage-return updates) reduced to its final state, as a
    terminal shows it at the end; text without progress bars is returned unchanged."""
    if "\r" not in text:
        return text
    out = []
    for seg in text.split("\n"):
        line = seg.split("\r")[-1]
        if "\r" in seg and not line.strip():
            continue  # a bar's reset
        if "%|" in line and out and "%|" in out[-1] and out[-1].split(":")[0] == line.split(":")[0]:
            out[-1] = line
        else:
            out.append(line)
    return "\n".join(out)


def clean_notebook(nb) -> None:
    """Collapse progress bars to their final line and drop execution timestamps (in place)."""
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
        merged = []
        for out in cell.get("outputs", []):  # consecutive chunks of one stream, as a notebook front end shows them
            if merged and out.get("output_type") == "stream" and merged[-1].get("output_type") == "stream" \
                    and merged[-1]["name"] == out["name"]:
                merged[-1]["text"] += out["text"]
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = _final_progress(out["text"])
        if cell.get("cell_type") == "code":
            cell["outputs"] = [o for o in merged if o.get("output_type") != "stream" or o["text"]]


def _reproduce(args: argparse.Namespace) -> int:
    import nbformat
    from nbclient import NotebookClient
    from tqdm import tqdm

    paths = [pathlib.Path(p) for p in args.notebooks] or sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))
    if not paths:
        raise UserError("no notebooks found")
    if args.timeout < 1:
        raise UserError(f"--timeout must be >= 1 (seconds per cell), got {args.timeout}")
    if args.in_place and args.out is not None:
        raise UserError("--out and --in-place exclude each other (--in-place writes over the notebooks themselves)")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"notebook(s) not found: {', '.join(missing)}")
    for path in paths:  # each notebook parses before any runs
        try:
            nbformat.read(path, as_version=4)
        except Exception as e:  # nbformat's NotJSONError, a JSON notebook of an unknown format, unreadable bytes
            raise UserError(f"{path}: not a notebook ({type(e).__name__})") from None
    out_dir = pathlib.Path(args.out if args.out is not None else REPO / "out" / "notebooks")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot create the directory ({e.strerror or type(e).__name__})") from None
    os.environ.setdefault("MPLBACKEND", "Agg")
    for path in tqdm(paths, desc="notebooks", unit="nb"):
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.resolve().parent)}})
        client.execute()
        clean_notebook(nb)
        target = path if args.in_place else out_dir / path.name
        nbformat.write(nb, target)
        tqdm.write(f"{path.name}: {time.perf_counter() - start:.0f} s -> {target}")
    print(f"figures in {REPO / 'figures'}")
    return 0


class UserError(Exception):
    """A mistake in the command line or its files: printed as one line, exit code 2."""


def _model_path(name: str) -> str:
    """A local directory as given, or a hub id; "path not found" for what can only be a local path."""
    p = pathlib.Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"--model {name}: not a model directory (no config.json)")
        try:
            config = json.loads((p / "config.json").read_text())
        except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UserError(f"--model {name}: config.json is not readable JSON ({type(e).__name__})") from None
        kind = config.get("model_type") if isinstance(config, dict) else None
        if kind != "llava":
            raise UserError(f"--model {name}: not a LLaVA model (config.json model_type {kind!r}, not 'llava')")
        return str(p)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith("/")
    if looks_local:
        raise UserError(f"--model {name}: path not found")
    return name


def _check_device(device: str) -> None:
    """auto, cpu, cuda or cuda:INDEX, where CUDA is present and INDEX names one of its GPUs."""
    import torch

    if device in ("auto", "cpu"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:INDEX, got {device!r}")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: no such GPU ({torch.cuda.device_count()} available)")


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub's retry warnings (a line per attempt when the hub cannot be reached) held back, so that a
    failed download ends in one error line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to several lines)."""
    return (str(e).strip().splitlines() or [""])[0]


def _check_output_file(flag: str, name: str, path: pathlib.Path, kind: str) -> None:
    """``flag name`` (at ``path``) must name a ``kind``, not a directory, in a directory that exists and is writable."""
    if path.is_dir():
        raise UserError(f"{flag} {name}: a directory; give a {kind} name")
    parent = path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {name}: directory {parent} does not exist or is not writable")


def _load(model: str, device: str, dtype: str):
    from .analysis.evaluate import load_model

    path = _model_path(model)
    try:
        with _quiet_hub():
            return load_model(path, device, dtype)
    except (OSError, ValueError, KeyError) as e:  # no weights, a config that is not JSON or not a LLaVA model, ...
        raise UserError(f"--model {model}: cannot load it ({type(e).__name__}: {_first_line(e)})") from None


def _dataset(args, processor):
    from .analysis.evaluate import load_vqa
    from .testbed.check import readable_qtypes
    from .testbed.shapes import ShapesVQA

    if args.dataset in (None, "shapes"):  # every question type the model's vocabulary reads
        ds = ShapesVQA(split=args.split, n=args.n, seed=args.seed, qtypes=readable_qtypes(processor))
        n = len(ds) if args.limit is None else min(args.limit, len(ds))
        # rendered once (not once per method x budget); the per-pixel id map is not needed here
        return [{k: v for k, v in ds[i].items() if k not in ("idmap", "coverage")} for i in range(n)]
    try:
        with _quiet_hub():
            return load_vqa(args.dataset, split=args.split, limit=args.limit)
    except Exception as e:  # a hub id: the datasets library's errors (offline, unknown id or split, bad files, ...)
        first = _first_line(e)
        if not args.dataset.endswith(".json"):
            raise UserError(f"--dataset {args.dataset}: {type(e).__name__}: {first}") from None
        if isinstance(e, (ValueError, OSError)):  # a bad record, or a file that cannot be read
            raise UserError(f"--dataset: {first}") from None
        raise


def _eval_args(args) -> tuple[list[str], list[int]]:
    """Check every argument of ``eval`` before any work."""
    from .hf.prune import IN_LLM, known_methods
    from .testbed.shapes import SPLIT_IDS

    known = known_methods()
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",")))  # repeats run once
    if "" in methods:
        raise UserError(f"--methods must be method names separated by commas, got {args.methods!r}")
    bad = [m for m in methods if m not in known]
    if not methods or bad:
        raise UserError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(known)}")
    try:
        budgets = list(dict.fromkeys(int(b) for b in args.budgets.split(",")))
    except ValueError:
        raise UserError(f"--budgets must be positive integers separated by commas, got {args.budgets!r}") from None
    if not budgets or min(budgets) < 1:
        raise UserError(f"--budgets must be positive integers, got {args.budgets!r}")
    for name in ("batch_size", "n", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    in_llm = [m for m in methods if m in IN_LLM]
    if args.positions == "compact" and in_llm:
        raise UserError(f"--positions compact: {', '.join(in_llm)} implement(s) original positions only; evaluate "
                        "them without --positions (or with --positions original)")
    if args.prompt is not None and ("{question}" not in args.prompt or "<image>" not in args.prompt):
        raise UserError("--prompt must contain <image> and {question}")
    if args.prompt is not None and args.prompt.count("<image>") != 1:
        raise UserError(f"--prompt must contain <image> once, got it {args.prompt.count('<image>')} times")
    if args.prompt is not None:
        try:
            args.prompt.format(question="x")
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"--prompt: only {{question}} may stand in braces (write {{{{ and }}}} for a literal "
                            f"brace); {type(e).__name__}: {e}") from None
    if args.prompt is not None and "sparsevlm" in methods and not args.prompt.split("<image>")[-1].strip():
        raise UserError("--prompt: sparsevlm chooses its raters among the text after the image; put text (e.g. "
                        "{question}) after <image>")
    if args.dataset in (None, "shapes") and args.split not in SPLIT_IDS:
        raise UserError(f"--split must be one of {', '.join(SPLIT_IDS)} for ShapesVQA, got {args.split!r}")
    if args.dataset is not None and not args.dataset.strip():
        raise UserError("--dataset must not be empty: 'shapes', a .json file or a Hugging Face dataset id")
    if args.dataset not in (None, "shapes") and pathlib.Path(args.dataset).is_dir():
        raise UserError(f"--dataset {args.dataset}: a directory; give a .json file or a Hugging Face dataset id")
    if args.dataset not in (None, "shapes") and args.dataset.endswith(".json") and not pathlib.Path(args.dataset).is_file():
        raise UserError(f"--dataset {args.dataset}: file not found")
    if args.out is not None:
        if not args.out.strip():
            raise UserError("--out must be a file name, got ''")
        _check_output_file("--out", args.out, pathlib.Path(args.out), "CSV file")
    _check_device(args.device)
    _model_path(args.model)
    return methods, budgets


def _eval(args: argparse.Namespace) -> int:
    import pandas as pd

    from .analysis.evaluate import default_prompt, evaluate
    from .hf.prune import default_positions

    methods, budgets = _eval_args(args)

    def positions(method):  # what each method runs with
        return args.positions or default_positions(method)

    label = args.dataset or "shapes"
    done = pd.DataFrame()
    if args.out and pathlib.Path(args.out).is_file() and pathlib.Path(args.out).stat().st_size:
        try:
            done = pd.read_csv(args.out)
        except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError and EmptyDataError are ValueErrors
            raise UserError(f"--out {args.out}: not a CSV table of results ({type(e).__name__}); choose another "
                            "file (or delete it)") from None
        if not {"dataset", "method", "budget", "n"} <= set(done) or set(done["dataset"]) != {label}:
            raise UserError(f"--out {args.out} holds other results; choose another file (or delete it)")
        if "positions" not in done:  # written before the knob: every method ran with its own positions
            done["positions"] = [default_positions(m) for m in done["method"]]
    data = None if args.dataset in (None, "shapes") else _dataset(args, None)  # records checked before the model
    model, processor = _load(args.model, args.device, args.dtype)
    from .hf.patch import tokens_per_image

    if data is not None:  # the size of a mask needs the model's tokens per image
        from .analysis.evaluate import check_record

        for i, r in enumerate(data):
            try:
                check_record(r, f"--dataset {args.dataset}: record {i}", tokens_per_image(model))
            except ValueError as e:
                raise UserError(str(e)) from None
    if "sparsevlm" in methods:  # its budget is an average over the decoder layers: some cannot be reached
        from .hf.sparsevlm import schedule

        n = tokens_per_image(model)
        for b in budgets:
            try:
                schedule(b, model.config.text_config.num_hidden_layers, n) if b < n else None
            except ValueError as e:
                raise UserError(f"--budgets {b}: {e}") from None
    data = _dataset(args, processor) if data is None else data
    prompt = args.prompt or default_prompt(processor)
    if len(done) and set(done["n"]) != {len(data)}:
        raise UserError(f"--out {args.out} holds results on {sorted(set(done['n']))} questions, this run has "
                        f"{len(data)}; choose another file (or delete it)")
    finished = set(zip(done.get("method", []), done.get("budget", []), done.get("positions", [])))
    jobs = [(m, b) for m in methods for b in budgets if (m, b, positions(m)) not in finished]
    if finished:
        print(f"resuming {args.out}: {len(finished)} job(s) done, {len(jobs)} to run")
    tables = [done] if len(done) else []
    for method, budget in jobs:  # one (method, budget) at a time, written as it finishes
        row = evaluate(model, processor, data, methods=[method], budgets=[budget], batch_size=args.batch_size,
                       prompt=prompt, patch_kwargs={"positions": args.positions})
        row = row.assign(dataset=label, positions=positions(method))
        tables.append(row)
        if args.out:
            pd.concat(tables, ignore_index=True).to_csv(args.out, index=False)
    table = pd.concat(tables, ignore_index=True)
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(table.drop(columns="dataset").round(3).to_string(index=False))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from .analysis.evaluate import evaluate
    from .notebook.plotting import overlay_kept, save_figure
    from .testbed.check import readable_qtypes
    from .testbed.shapes import ShapesVQA

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.figures is not None:
        try:
            pathlib.Path(args.figures).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--figures {args.figures}: cannot create the directory "
                            f"({e.strerror or type(e).__name__})") from None
    _check_device(args.device)
    model, processor = _load(args.model, args.device, "auto")
    data = ShapesVQA(split="test", n=args.n, seed=args.seed, qtypes=readable_qtypes(processor))
    methods, budgets = ["svd", "fastv", "random"], [576, 64, 16]
    _, per = evaluate(model, processor, data, methods, budgets, return_samples=True, progress=False)
    per = per.assign(correct=per["score"].astype(int))
    table = per.pivot_table(index=["index", "answer"], columns=["method", "budget"], values="prediction",
                            aggfunc="first")
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print("questions:")
        for i in range(len(data)):
            print(f"  {i}: {data[i]['question']}  (answer: {data[i]['answer']})")
        print(table.to_string())
        print("\naccuracy:", per.groupby(["method", "budget"])["correct"].mean().round(2).to_dict())
    # overlay of the kept tokens for the first image
    from .analysis.evaluate import model_inputs
    from .hf.patch import patch_llava, unpatch_llava

    item = data[0]
    inputs = model_inputs(model, processor, [item], args.prompt)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for ax, method in zip(axes, methods):
        patch_llava(model, method=method, budget=64)
        try:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            overlay_kept(item["image"], model.svdprune.kept_indices[0], ax=ax)
        finally:
            unpatch_llava(model)
        ax.set_title(f"{method}, K = 64")
    path = save_figure(fig, "demo-kept-tokens", directory=args.figures)
    print(f"saved {path}")
    return 0


def _train_tiny(args: argparse.Namespace) -> int:
    from .testbed.tiny import evaluate_tiny, train_tiny

    _check_device(args.device)
    for name in ("stage1_samples", "stage2_images", "stage2_steps", "workers"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= {0 if name == 'workers' else 1}, got {value}")
    if args.stage1_from is not None and not pathlib.Path(args.stage1_from).is_dir():
        raise UserError(f"--stage1-from {args.stage1_from}: path not found")
    over = {k: v for k, v in dict(stage1_samples=args.stage1_samples, stage2_images=args.stage2_images,
                                  stage2_steps=args.stage2_steps).items() if v is not None}
    if args.recipe == "v2" and args.workers != 1:
        raise UserError("--workers is for --recipe v1 (the v2 recipe renders its scenes in the main process)")
    if args.recipe == "v2":
        from dataclasses import replace

        from .testbed.train_v2 import RecipeV2, train_v2

        if args.device != "cpu":
            raise UserError("--recipe v2 trains on the CPU (resume by rerunning the same command)")
        res = train_v2(args.out, seed=args.seed, recipe=replace(RecipeV2(), **over), time_budget=args.time_budget,
                       stage1_from=args.stage1_from)
        if "stopped" in res:
            print(f"stopped by --time-budget at stage {res['stage']} step {res['step']}; rerun the same command to "
                  f"continue from {args.out}/train_state.pt")
            return 0
        print("validation accuracy:", {k: v for k, v in res.items() if k.startswith("val_")})
        print(f"saved to {args.out} (log: train_log.csv, recipe: recipe.json); check it with "
              f"python -m svdprune_utils testbed-check --model {args.out}")
        return 0
    res = train_tiny(out_dir=args.out, seed=args.seed, device=args.device, workers=args.workers,
                     time_budget=args.time_budget, stage1_from=args.stage1_from, **over)
    print("validation accuracy:", {k: round(v, 3) for k, v in res.items()})
    ev = evaluate_tiny(args.out, seed=args.seed)
    print("test accuracy (576 tokens):", {k: round(v, 3) for k, v in ev["576"].items()})
    print(f"saved to {args.out} (log: train_log.csv, recipe: recipe.json, test accuracy: eval.json)")
    return 0


def _testbed_check(args: argparse.Namespace) -> int:
    from .testbed import check

    try:
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be integers separated by commas, got {args.seeds!r}") from None
    if min(seeds) < 0:
        raise UserError(f"--seeds must be >= 0, got {args.seeds!r}")
    if args.n < len(check.S.ALL_QTYPES):
        raise UserError(f"--n must be >= {len(check.S.ALL_QTYPES)} (one question per type), got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.split not in check.S.SPLIT_IDS:
        raise UserError(f"--split must be one of {', '.join(check.S.SPLIT_IDS)}, got {args.split!r}")
    if args.json:
        _check_output_file("--json", args.json, pathlib.Path(args.json).expanduser(), "file")
    _check_device(args.device)
    model, processor = _load(args.model, args.device, "fp32")
    if check.tokens_per_image(model) < max(check.ORACLE_BUDGETS) + 1:
        raise UserError(f"--model {args.model}: {check.tokens_per_image(model)} image tokens; the check needs "
                        f"more than {max(check.ORACLE_BUDGETS)}")
    res = check.testbed_check(model, processor, seeds, args.n, args.split, batch_size=args.batch_size)
    print(check.report(res))
    if args.json:
        pathlib.Path(args.json).expanduser().write_text(check.to_json(res))
        print(f"saved {args.json}")
    return 0 if all(r["passed"] for r in res) else 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse's default adds the usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


EVAL_EPILOG = """local JSON datasets (--dataset FILE.json): a JSON list of records
  {"image": "img/0.png", "question": "what colour is the circle?", "answers": ["red", ...],
   "qtype": "colour", "mask": [[0, 1, ...], ...]}
  image: a path, relative to the JSON file or absolute (8- or 16-bit PNG/JPEG); answers: a non-empty list of
  non-empty strings (or "answer": a string; not both); qtype (optional): a string, for per-type columns; mask
  (optional): the answer region as a 24x24 (N-entry) grid of true/false (or 0/1), for answer-region recall.
  Every record is checked before the model runs. Results are written to --out after every (method, budget)
  job; rerunning with the same --out skips the jobs already there."""


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except UserError as e:
        print(f"python -m svdprune_utils: error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m svdprune_utils", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="execute the notebooks on copies and write figures/")
    rep.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/[0-9]*.ipynb)")
    rep.add_argument("--out", default=None, help="where executed copies go (default: out/notebooks)")
    rep.add_argument("--timeout", type=int, default=1800, help="per-cell timeout in seconds")
    rep.add_argument("--in-place", action="store_true",
                     help="write the executed notebooks over the committed ones (how they are produced)")
    rep.set_defaults(func=_reproduce)

    from .testbed.tiny import DEFAULT_PATH, PROMPT, TRAIN_PATH

    ev = sub.add_parser("eval", help="accuracy vs budget for methods x budgets", epilog=EVAL_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Accuracy, per-type accuracy, answer-region recall and prefill time of every "
                                    "method at every budget (greedy answers, VQA scoring).")
    ev.add_argument("--model", default=str(DEFAULT_PATH),
                    help="a local model directory or a hub id such as llava-hf/llava-1.5-7b-hf (default: the "
                         "embedded tiny model)")
    ev.add_argument("--dataset", default=None, help="'shapes' (default: ShapesVQA), a local .json (format below), "
                                                     "or a Hugging Face dataset id")
    ev.add_argument("--split", default="test", help="ShapesVQA split, or the HF split (e.g. validation)")
    ev.add_argument("--n", type=int, default=600, help="ShapesVQA questions to generate (default 600)")
    ev.add_argument("--methods", default="svd,fastv,cls_attention,random",
                    help="comma-separated methods: selectors (svd, fastv, cls_attention, vispruner, cdpruner, ...), "
                         "the merging visionzip, or sparsevlm (in the LLM) (default: svd,fastv,cls_attention,random)")
    ev.add_argument("--budgets", default="576,192,128,64,32,16",
                    help="comma-separated image tokens kept per image (sparsevlm: its official budget, the average "
                         "image tokens per decoder layer) (default: 576,192,128,64,32,16)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    ev.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    ev.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ev.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                    help="auto: fp16 on CUDA, fp32 on CPU")
    ev.add_argument("--seed", type=int, default=0, help="ShapesVQA seed (default 0)")
    ev.add_argument("--prompt", default=None,
                    help="prompt template with <image> and {question} (default: the LLaVA-1.5 prompt, with its "
                         "short-answer instruction when the model's vocabulary can read it)")
    ev.add_argument("--positions", default=None, choices=["compact", "original"],
                    help="position ids of the kept tokens: compact (consecutive after the cut) or original (their "
                         "positions in the full prompt); default: each method's own (compact before the LLM, "
                         "original for fastv and sparsevlm, which implement only original)")
    ev.add_argument("--out", help="CSV file, written after every job; an existing one is resumed")
    ev.set_defaults(func=_eval)

    de = sub.add_parser("demo", help="answers at 576/64/16 tokens for svd, fastv, random + overlay figure")
    de.add_argument("--model", default=str(DEFAULT_PATH))
    de.add_argument("--n", type=int, default=4, help="questions")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--device", default="cpu")
    de.add_argument("--figures", default=None, help="figure directory (default: figures/)")
    de.set_defaults(func=_demo, prompt=PROMPT)

    tr = sub.add_parser("train-tiny", help="train the embedded tiny LLaVA from scratch")
    tr.add_argument("--out", default=str(TRAIN_PATH),
                    help=f"output directory (default {TRAIN_PATH.relative_to(REPO)}; the embedded model in "
                         f"{DEFAULT_PATH.relative_to(REPO)} is only replaced when named here)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--recipe", choices=("v1", "v2"), default="v2",
                    help="v2 (default): the embedded model's recipe, six decoder layers trained on pruned prompts "
                         "and ten question types, then its fine-tuning phases (testbed/train_v2.py), resumable: "
                         "rerun the same command after an interruption; v1: the earlier model's recipe "
                         "(testbed/tiny.py, data/tiny-llava-shapes-v1)")
    tr.add_argument("--device", default="cpu", help="cpu (the reference), cuda or auto")
    tr.add_argument("--workers", type=int, default=1, help="DataLoader processes rendering scenes")
    tr.add_argument("--stage1-samples", type=int, default=None, help="images for stage 1 (default: recipe)")
    tr.add_argument("--stage2-images", type=int, default=None, help="scenes in the stage-2 pool (default: recipe)")
    tr.add_argument("--stage2-steps", type=int, default=None,
                    help="stage-2 steps (default: recipe; v2: the fine-tuning phases keep their own)")
    tr.add_argument("--time-budget", type=float, default=None,
                    help="seconds; v1: ends stage 2 early once the run has taken this long; v2: stops at the next "
                         "checkpoint after this long (rerun to continue)")
    tr.add_argument("--stage1-from", default=None,
                    help="v1: skip stage 1, reuse the vision tower (and stage-1 log rows) of an earlier run's output; "
                         "v2: the v1 stage-1 tower to fine-tune (default: run v1's stage 1 first; "
                         "data/tiny-llava-shapes-v1 holds it)")
    tr.set_defaults(func=_train_tiny)

    tc = sub.add_parser("testbed-check", help="does accuracy under pruning measure the selection on a model?",
                        description="Five properties of a pruning testbed on ShapesVQA, every pruned prompt through "
                                    "the patch: all tokens, one token dropped, an oracle selection at 16-192 tokens, "
                                    "16 random tokens, FastV keeping one token after layer 2 (thresholds: "
                                    "svdprune_utils/testbed/check.py). Exit code 0 when every property holds on "
                                    "every seed, 1 when one fails, 2 on a usage error.")
    tc.add_argument("--model", default=str(DEFAULT_PATH), help="a local LLaVA model directory (default: the "
                                                                "embedded tiny model)")
    tc.add_argument("--seeds", default="0", help="comma-separated ShapesVQA seeds (default 0)")
    tc.add_argument("--n", type=int, default=400, help="questions per seed, balanced over the types (default 400: 40 "
                    "per type of ten, so that one question moves a type by 0.025, not 0.056 as at 18)")
    tc.add_argument("--split", default="test", help="ShapesVQA split (default test)")
    tc.add_argument("--batch-size", type=int, default=32, help="prompts per forward (default 32)")
    tc.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    tc.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    tc.set_defaults(func=_testbed_check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
