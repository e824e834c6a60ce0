"""Outputs never destroy what they point at: a device, FIFO, socket or folder at an output path is refused
before any work and never renamed over; no command writes into the installed package."""

import json
import os
import socket
import stat
from pathlib import Path

import pytest
import torch

import moe_reroute
from cli_helpers import bad_input
from tiny_models import tiny_model, tiny_tokenizer

PACKAGE = Path(moe_reroute.__file__).resolve().parent


def char_device(path: Path) -> Path:
    """A character device node (1, 3: what /dev/null is) at `path`, in the test's own folder."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return path


def still(path: Path, kind) -> None:
    assert kind(os.lstat(path).st_mode), f"{path} was replaced: mode {os.lstat(path).st_mode:o}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("qwen3_moe").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "text.txt").write_text("the quick brown fox jumps over the lazy dog.\n\n" * 40)
    return folder


@pytest.fixture
def no_model(monkeypatch):
    import moe_reroute.cli.measure as measure
    import moe_reroute.cli.tune as tune

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(measure, "load_model", fail)
    monkeypatch.setattr(tune, "load_model", fail)


def test_calibrate_refuses_a_device_or_fifo_as_out(tmp_path, capsys, checkpoint, no_model):
    text = checkpoint / "text.txt"
    dev = char_device(tmp_path / "null")
    bad_input(capsys, ["calibrate", "--text", text, "--out", dev], f"--out {dev} is a device")
    still(dev, stat.S_ISCHR)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    bad_input(capsys, ["calibrate", "--text", text, "--out", fifo], f"--out {fifo} is a FIFO")
    still(fifo, stat.S_ISFIFO)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        bad_input(capsys, ["calibrate", "--text", text, "--out", tmp_path / "sock"], "is a socket")
    finally:
        sock.close()
    still(tmp_path / "sock", stat.S_ISSOCK)


def test_calibrate_end_to_end_onto_a_device_leaves_it(tmp_path, capsys, checkpoint):
    """The whole command (model loaded) with --out a device: refused, the device still a device."""
    dev = char_device(tmp_path / "null")
    bad_input(capsys, ["calibrate", "--model", checkpoint, "--text", checkpoint / "text.txt", "--out", dev],
              "is a device")
    still(dev, stat.S_ISCHR)


def test_library_writers_refuse_special_files(tmp_path):
    from moe_reroute.contract import RouterSpec
    from moe_reroute.hf.calibrate import save_similarity
    from moe_reroute.traces import Trace

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is a FIFO"):
        save_similarity({0: torch.eye(4)}, fifo)
    trace = Trace({0: torch.randn(2, 3, 4)}, torch.ones(2, 3, dtype=torch.bool), {0: RouterSpec(4, 2)})
    with pytest.raises(ValueError, match="is a FIFO"):
        trace.save(fifo)
    with pytest.raises(ValueError, match="is a folder"):
        trace.save(tmp_path)
    still(fifo, stat.S_ISFIFO)
    dev = char_device(tmp_path / "null")
    with pytest.raises(ValueError, match="is a device"):
        trace.save(dev)
    still(dev, stat.S_ISCHR)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "null"]  # no temporary file left
    trace.save(tmp_path / "ok.safetensors")  # a regular file is written as before
    assert (tmp_path / "ok.safetensors").stat().st_size > 0


def test_never_renamed_over_a_node_that_appears_during_the_write(tmp_path):
    from moe_reroute.files import write_atomic

    target = tmp_path / "out.json"

    def write(tmp):
        tmp.write_text("{}")
        os.mkfifo(target)  # something else puts a FIFO at the output path meanwhile

    with pytest.raises(ValueError, match="is a FIFO"):
        write_atomic(target, write)
    still(target, stat.S_ISFIFO)
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_tune_checks_every_file_it_writes_before_any_work(tmp_path, capsys, no_model):
    dev = char_device(tmp_path / "null")
    bad_input(capsys, ["tune", "--policy", "oea", "--out", dev], f"--out {dev} is a device")
    still(dev, stat.S_ISCHR)
    fifo = tmp_path / "tuned.tune.json"
    os.mkfifo(fifo)
    bad_input(capsys, ["tune", "--policy", "oea", "--out", tmp_path / "tuned.json"], f"{fifo} is a FIFO")
    still(fifo, stat.S_ISFIFO)
    assert not (tmp_path / "tuned.json").exists()


def test_eval_checks_its_result_file_before_the_run(tmp_path, capsys, no_model):
    os.mkfifo(tmp_path / "eval.json")
    bad_input(capsys, ["eval", "--out", tmp_path], f"{tmp_path / 'eval.json'} is a FIFO")
    dev = char_device(tmp_path / "null")
    bad_input(capsys, ["eval", "--out", dev], f"--out {dev} is a device, not a folder")


@pytest.mark.parametrize("argv", [
    ["calibrate", "--text", "{text}", "--out", "{pkg}/sim.safetensors"],
    ["eval", "--out", "{pkg}/results"],
    ["tune", "--policy", "oea", "--out", "{pkg}/reference/tuned.json"],
    ["report", "{eval}", "--out", "{pkg}/report"],
    ["demo", "--out", "{pkg}"],
    ["synth-model", "--shape", "qwen3-30b-a3b", "--layers", "1", "--out", "{pkg}/synth"],
    ["serve-bench", "--out", "{pkg}/serve"],
    ["train-reference", "--out", "{pkg}/reference/model2", "--workdir", "{tmp}"],
    ["reference-card", "--out", "{pkg}/card"],
])
def test_no_command_writes_into_the_installed_package(tmp_path, capsys, checkpoint, no_model, argv):
    before = sorted(str(p) for p in PACKAGE.rglob("*"))
    from test_cli_errors import eval_result

    (tmp_path / "eval.json").write_text(json.dumps(eval_result()))
    argv = [a.format(pkg=PACKAGE, text=checkpoint / "text.txt", tmp=tmp_path, eval=tmp_path / "eval.json")
            for a in argv]
    bad_input(capsys, argv, "inside the installed moe_reroute package")
    assert sorted(str(p) for p in PACKAGE.rglob("*")) == before
