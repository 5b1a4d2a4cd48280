"""Data records, image conversion, prompts and the eval/train-tiny command line: clean one-line errors before any
work, results written per job and resumed, the local-JSON path on the embedded model."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from svdprune_utils.analysis.evaluate import LLAVA_PROMPT, SHORT_ANSWER, check_record, default_prompt, load_vqa, to_rgb
from svdprune_utils.cli import main as cli
from svdprune_utils.testbed import tiny

FIXTURE = pathlib.Path(__file__).parent / "data" / "vqa_fixture" / "vqa.json"
SHIPPED = tiny.DEFAULT_PATH


def _write(tmp_path, records, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


def test_16_bit_png_keeps_its_grey_levels(tmp_path):
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000 of 65535
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        rgb = np.asarray(to_rgb(im))
    np.testing.assert_array_equal(rgb[..., 0], np.round(a / 257.0).astype(np.uint8))
    assert rgb.min() == 0 and rgb.max() == round(63000 / 257)  # not clipped to white
    _write(tmp_path, [{"image": "g16.png", "question": "q?", "answers": ["a"]}])
    assert np.array_equal(np.asarray(load_vqa(str(tmp_path / "d.json"))[0]["image"]), rgb)


@pytest.mark.parametrize(("record", "field"), [
    ({"image": "x.png", "question": "q?"}, "answers"),
    ({"image": "x.png", "question": "q?", "answers": []}, "answers"),
    ({"image": "x.png", "question": "q?", "answers": "  "}, "answers"),
    ({"image": "x.png", "question": "q?", "answers": [1, 2]}, "answers"),
    ({"image": "x.png", "question": "q?", "answers": {"a": 1}}, "answers"),
    ({"image": "x.png", "question": "", "answers": ["a"]}, "question"),
    ({"image": "x.png", "question": "q?", "answers": ["a"], "qtype": 3}, "qtype"),
    ({"image": 7, "question": "q?", "answers": ["a"]}, "image"),
])
def test_bad_records_name_the_record_and_the_field(tmp_path, record, field):
    good = {"image": "img0.jpg", "question": "q?", "answers": ["a"]}
    p = _write(tmp_path, [good, record])
    with pytest.raises(ValueError, match=rf"record 1 of .*'{field}'|record 1 of .*{field}"):
        load_vqa(str(p))


def test_a_mask_of_the_wrong_shape_is_refused_before_the_model_runs():
    item = {"question": "q?", "answers": ["a"], "mask": np.zeros((20, 20), bool)}
    with pytest.raises(ValueError, match="dataset record 4: 'mask'.*576"):
        check_record(item, "dataset record 4", 576)
    check_record(dict(item, mask=np.zeros((24, 24), bool)), "ok", 576)


def test_the_prompt_follows_the_model():
    assert default_prompt(tiny.build_processor()) == LLAVA_PROMPT  # the instruction would be <unk> words

    class Full:
        unk_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [5] * len(text.split())}

    assert default_prompt(Full()) == LLAVA_PROMPT.replace("{question}", "{question}" + SHORT_ANSWER)


def test_eval_on_a_local_json_with_the_embedded_model_reads_the_question(tmp_path, capsys):
    # the fixture's questions are ShapesVQA-style: the embedded model answers them (it scored 0 with the suffix)
    out = tmp_path / "res.csv"
    assert cli(["eval", "--dataset", str(FIXTURE), "--methods", "svd", "--budgets", "576", "--device", "cpu",
                "--out", str(out)]) == 0
    assert pd.read_csv(out)["accuracy"].iloc[0] > 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "svd,nope"], "--methods: unknown nope"),
    (["--budgets", "64,x"], "--budgets must be positive integers"),
    (["--budgets", "0"], "--budgets must be positive integers"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--model", "./no/such/model"], "path not found"),
    (["--model", "/tmp"], "not a model directory"),
    (["--out", "/no/such/dir/x.csv"], "does not exist or is not writable"),
    (["--dataset", "missing.json"], "file not found"),
    (["--prompt", "no placeholders"], "--prompt must contain"),
    (["--dtype", "fp8"], "invalid choice"),
    (["--positions", "shifted"], "invalid choice"),
    (["--methods", "svd,fastv", "--positions", "compact"], "fastv implement(s) original positions only"),
    (["--methods", "sparsevlm", "--positions", "compact"], "sparsevlm implement(s) original positions only"),
    (["--methods", "sparsevlm", "--prompt", "{question} <image>"], "sparsevlm chooses its raters among the text"),
])
def test_eval_user_errors_are_one_line_and_exit_2(capsys, argv, message):
    by_argparse = "--dtype" in argv or "shifted" in argv  # choices: argparse exits (2) itself
    assert cli(["eval", *argv]) == 2 if not by_argparse else True
    if by_argparse:
        with pytest.raises(SystemExit) as e:
            cli(["eval", *argv])
        assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_eval_runs_the_peers_whose_signals_the_patch_computes(tmp_path, capsys):
    out = tmp_path / "res.csv"
    assert cli(["eval", "--methods", "vispruner,cdpruner,visionzip,sparsevlm", "--budgets", "16", "--limit", "2",
                "--n", "2", "--device", "cpu", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table["method"]) == ["vispruner", "cdpruner", "visionzip", "sparsevlm"]
    from svdprune_utils.hf.sparsevlm import schedule

    layers = tiny.load_tiny()[0].config.text_config.num_hidden_layers  # the embedded model's (6)
    last = schedule(16, layers, 576).counts[-1]  # SparseVLM's 16 is an average over the layers
    assert list(table["tokens"]) == [16, 16, 16, last] and last < 16
    assert cli(["eval", "--methods", "nope"]) == 2
    assert "visionzip" in capsys.readouterr().err  # the merging method is listed among the choices


def test_eval_positions_is_a_column_and_a_resume_key(tmp_path, capsys):
    out = tmp_path / "res.csv"
    args = ["eval", "--methods", "svd,fastv", "--budgets", "16", "--limit", "2", "--n", "2", "--device", "cpu",
            "--out", str(out)]
    assert cli([*args, "--positions", "original"]) == 0
    assert list(pd.read_csv(out)["positions"]) == ["original", "original"]
    assert cli(args) == 0  # each method's own: svd runs again (compact), fastv's original row is already there
    table = pd.read_csv(out)
    assert list(zip(table["method"], table["positions"])) == [("svd", "original"), ("fastv", "original"),
                                                             ("svd", "compact")]
    assert "1 to run" in capsys.readouterr().out


def test_train_tiny_user_errors_and_default_output(capsys):
    assert cli(["train-tiny", "--stage2-steps", "0"]) == 2
    assert cli(["train-tiny", "--stage1-from", "/no/such/run"]) == 2
    assert cli(["train-tiny", "--workers", "2"]) == 2  # v2 (the default) renders in the main process
    assert "path not found" in capsys.readouterr().err
    assert tiny.TRAIN_PATH != tiny.DEFAULT_PATH and "out" in tiny.TRAIN_PATH.parts
    import inspect

    assert inspect.signature(tiny.train_tiny).parameters["out_dir"].default == tiny.TRAIN_PATH


def test_eval_writes_each_job_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "res.csv"
    args = ["eval", "--methods", "svd,random", "--budgets", "576,16", "--limit", "4", "--n", "4", "--device", "cpu",
            "--out", str(out)]
    import svdprune_utils.analysis.evaluate as E

    calls, real = [], E.evaluate

    def once(*a, **k):
        calls.append((k["methods"][0], k["budgets"][0]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is interrupted during its third job
        return real(*a, **k)

    monkeypatch.setattr(E, "evaluate", once)
    with pytest.raises(KeyboardInterrupt):
        cli(args)
    kept = pd.read_csv(out)
    assert list(zip(kept["method"], kept["budget"])) == [("svd", 576), ("svd", 16)]  # what finished is kept
    calls.clear()
    assert cli(args) == 0
    assert calls == [("random", 576), ("random", 16)]  # only the missing jobs run
    table = pd.read_csv(out)
    assert list(zip(table["method"], table["budget"])) == [("svd", 576), ("svd", 16), ("random", 576), ("random", 16)]
    assert "resuming" in capsys.readouterr().out
    assert cli([*args[:-1], str(out), "--dataset", str(FIXTURE)]) == 2  # another dataset: refuse to mix


def test_reproduce_cleaning_keeps_text_and_collapses_progress_bars():
    import nbformat

    from svdprune_utils.cli import clean_notebook

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.metadata["execution"] = {"iopub.execute_input": "2026-11-30"}
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="table\n\nrow 1\n"),
                    nbformat.v4.new_output("stream", name="stderr", text="\rjobs:   0%|  | 0/2"),
                    nbformat.v4.new_output("stream", name="stderr", text="\rjobs:  50%|# | 1/2"),
                    nbformat.v4.new_output("stream", name="stderr", text="\rjobs: 100%|##| 2/2\n")]
    nb.cells = [cell]
    clean_notebook(nb)
    assert [o.text for o in nb.cells[0].outputs] == ["table\n\nrow 1\n", "jobs: 100%|##| 2/2\n"]
    assert "execution" not in nb.cells[0].metadata


def test_eval_help_documents_every_option_and_the_json_format(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--dataset", "--split", "--n", "--methods", "--budgets", "--limit", "--batch-size",
                   "--device", "--dtype", "--seed", "--prompt", "--positions", "--out"):
        assert option in out
    assert "local JSON datasets" in out and '"answers"' in out and "resum" in out


def test_eval_runs_a_repeated_method_or_budget_once(tmp_path):
    out = tmp_path / "res.csv"
    assert cli(["eval", "--methods", "svd,svd", "--budgets", "16,16", "--limit", "1", "--n", "1", "--device", "cpu",
                "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 1


def _one_error_line(capsys, argv, *words):
    """``argv`` exits with code 2 and a single stderr line holding every one of ``words``."""
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("python -m svdprune_utils: error: ") and all(w in err for w in words), err


@pytest.mark.parametrize("command", ["eval", "demo", "testbed-check", "train-tiny"])
def test_an_unknown_device_is_one_line(capsys, command):
    _one_error_line(capsys, [command, "--device", "tpu"], "--device", "tpu", "auto, cpu, cuda")


def test_cuda_without_cuda_or_a_missing_gpu_is_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in ("eval", "demo", "testbed-check"):
        _one_error_line(capsys, [command, "--device", "cuda"], "--device cuda", "CUDA is not available")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _one_error_line(capsys, ["eval", "--device", "cuda:99"], "--device cuda:99", "no such GPU", "1 available")


@pytest.mark.parametrize(("argv", "words"), [
    (["--split", "bogus"], ("--split", "bogus", "train, val, test")),
    (["--dataset", "shapes", "--split", "bogus"], ("--split", "bogus")),
    (["--out", ""], ("--out", "file name")),
    (["--prompt", "<image> {question} {bogus}"], ("--prompt", "{question}", "KeyError", "bogus")),
    (["--prompt", "<image> {question} {"], ("--prompt", "{question}", "ValueError")),
    (["--prompt", "<image> {question} {0}"], ("--prompt", "{question}", "IndexError")),
    (["--prompt", "<image><image> {question}"], ("--prompt", "<image> once", "2 times")),
    (["--dataset", ""], ("--dataset", "must not be empty")),
    (["--methods", "svd,,fastv"], ("--methods", "'svd,,fastv'")),
    (["--methods", "svd,"], ("--methods", "'svd,'")),
])
def test_eval_argument_errors_are_one_line(capsys, argv, words):
    _one_error_line(capsys, ["eval", "--limit", "1", *argv], *words)


def test_eval_out_must_be_a_csv_file(tmp_path, capsys):
    _one_error_line(capsys, ["eval", "--limit", "1", "--out", str(tmp_path)], "--out", "a directory")
    binary = tmp_path / "res.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    _one_error_line(capsys, ["eval", "--limit", "1", "--out", str(binary)], "--out", "not a CSV table")
    binary.write_text("a,b\n1,2\n")  # a CSV, but not of results
    _one_error_line(capsys, ["eval", "--limit", "1", "--out", str(binary)], "--out", "holds other results")


def test_eval_dataset_errors_are_one_line(tmp_path, capsys, monkeypatch):
    _one_error_line(capsys, ["eval", "--dataset", str(tmp_path)], "--dataset", "a directory")
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'bogus_org/bogus_xyz' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    _one_error_line(capsys, ["eval", "--dataset", "bogus_org/bogus_xyz"], "--dataset", "Couldn't reach")

    def missing(*a, **k):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'bogus_org/bogus_xyz' doesn't exist\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    _one_error_line(capsys, ["eval", "--dataset", "bogus_org/bogus_xyz"], "--dataset bogus_org/bogus_xyz",
                    "DatasetNotFoundError", "doesn't exist")


@pytest.mark.parametrize(("config", "words"), [
    ('{"model_type": "bert"}', ("--model", "not a LLaVA model", "bert")),
    ("not json", ("--model", "config.json is not readable JSON")),
    (None, ("--model", "cannot load it", "OSError")),  # the embedded model's config, no weights
])
def test_eval_a_model_that_cannot_load_is_one_line(tmp_path, capsys, config, words):
    text = (SHIPPED / "config.json").read_text() if config is None else config
    (tmp_path / "config.json").write_text(text)
    _one_error_line(capsys, ["eval", "--limit", "1", "--device", "cpu", "--model", str(tmp_path)], *words)


def test_demo_testbed_check_and_reproduce_argument_errors_are_one_line(tmp_path, capsys):
    _one_error_line(capsys, ["demo", "--n", "0"], "--n must be >= 1")
    _one_error_line(capsys, ["demo", "--n", "-1"], "--n must be >= 1")
    _one_error_line(capsys, ["demo", "--n", "1", "--figures", "/dev/null/x"], "--figures /dev/null/x", "cannot create")
    _one_error_line(capsys, ["testbed-check", "--seeds", "0,-1"], "--seeds must be >= 0")
    _one_error_line(capsys, ["testbed-check", "--json", str(tmp_path)], "--json", "a directory")
    import nbformat

    good = tmp_path / "good.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), good)
    _one_error_line(capsys, ["reproduce", str(good), "--out", "/dev/null/x"], "--out /dev/null/x", "cannot create")
    _one_error_line(capsys, ["reproduce", str(good), "--timeout", "0"], "--timeout must be >= 1")
    _one_error_line(capsys, ["reproduce", str(good), "--timeout", "-1"], "--timeout must be >= 1")
    _one_error_line(capsys, ["reproduce", str(good), "--in-place", "--out", str(tmp_path)], "--out", "--in-place")
    (tmp_path / "bad.ipynb").write_text("x = 1\n")
    (tmp_path / "empty.ipynb").write_text("{}")
    out = tmp_path / "out"
    for bad in ("bad.ipynb", "empty.ipynb"):  # checked before any notebook runs: nothing is written
        _one_error_line(capsys, ["reproduce", str(good), str(tmp_path / bad), "--out", str(out)], bad,
                        "not a notebook")
        assert not (out / "good.ipynb").exists()
    _one_error_line(capsys, ["reproduce", str(tmp_path / "missing.ipynb")], "notebook(s) not found", "missing.ipynb")


def _image_dir(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")


GOOD = {"image": "ok.png", "question": "what color is the square ?", "answers": ["red"]}
NAN_MASK = np.zeros((24, 24)).tolist()
NAN_MASK[3][4] = float("nan")


@pytest.mark.parametrize(("records", "words"), [
    ([dict(GOOD, mask=np.zeros((23, 24), int).tolist())], ("record 0", "'mask'", "(23, 24)")),
    ([GOOD, dict(GOOD, mask=np.full((24, 24), 0.0).tolist())], ("record 1", "'mask'", "float")),
    ([dict(GOOD, mask=1)], ("record 0", "'mask'", "shape ()")),
    ([dict(GOOD, mask=[["a"] * 24] * 24)], ("record 0", "'mask'")),
    ([dict(GOOD, mask=[[0] * 24] * 23 + [[0] * 3])], ("record 0", "'mask'", "different lengths")),
    ([dict(GOOD, mask=NAN_MASK)], ("record 0", "'mask'", "float")),
    ([dict(GOOD, mask=np.full((24, 24), 2).tolist())], ("record 0", "'mask'", "other than 0/1")),
    ([dict(GOOD, image="text.png")], ("record 0", "'image'", "text.png", "not a readable image")),
    ([GOOD, dict(GOOD, image="empty.png")], ("record 1", "'image'", "empty.png", "not a readable image")),
    ([], ("no records",)),
    ([dict(GOOD, answer="red")], ("record 0", "'answer' and 'answers'")),
    ([dict(GOOD, answers=["red", ""])], ("record 0", "'answers'", "empty strings")),
    ([{k: v for k, v in dict(GOOD, answer=" ").items() if k != "answers"}], ("record 0", "'answers'", "empty")),
    ([dict(GOOD, question="<image> what color?")], ("record 0", "'question'", "<image>")),
])
def test_eval_bad_json_records_are_one_line_before_the_model_loads(tmp_path, capsys, records, words):
    _image_dir(tmp_path)
    p = _write(tmp_path, records)
    # one line: the model's loading progress would be a line of its own
    _one_error_line(capsys, ["eval", "--dataset", str(p), "--methods", "svd", "--budgets", "16", "--device", "cpu"],
                    "--dataset", *words)


def test_eval_a_square_mask_of_the_wrong_size_is_one_error_after_the_model_loads(tmp_path, capsys):
    _image_dir(tmp_path)
    p = _write(tmp_path, [GOOD, dict(GOOD, mask=np.zeros((20, 20), bool).tolist())])
    assert cli(["eval", "--dataset", str(p), "--methods", "svd", "--budgets", "16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and "Loading weights" in err[0]  # tqdm's bar of the model's weights
    assert err[-1].startswith("python -m svdprune_utils: error: --dataset") and "record 1" in err[-1]
    assert "'mask'" in err[-1] and "576 entries" in err[-1]


def test_eval_a_good_mask_runs(tmp_path):
    _image_dir(tmp_path)
    p = _write(tmp_path, [dict(GOOD, mask=np.eye(24, dtype=bool).tolist())])
    out = tmp_path / "res.csv"
    assert cli(["eval", "--dataset", str(p), "--methods", "svd", "--budgets", "16", "--device", "cpu",
                "--out", str(out)]) == 0
    assert 0 <= pd.read_csv(out)["region_recall"].iloc[0] <= 1
