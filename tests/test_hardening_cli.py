"""Numbers checked before any work, each message naming its option; failures of outside tools as one line;
Ctrl-C as one line, exit status 130 and no partial output that looks complete."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import bad_input

SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture
def nothing_loads(monkeypatch):
    import moe_reroute.cli.measure as measure
    import moe_reroute.cli.tune as tune
    import moe_reroute.reference as reference

    def fail(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for module, name in ((measure, "load_model"), (tune, "load_model"), (reference, "load")):
        monkeypatch.setattr(module, name, fail)


@pytest.mark.parametrize("argv,needles", [
    (["demo", "--replay-steps", "0"], ["--replay-steps must be >= 1, got 0"]),
    (["demo", "--bench-steps", "0"], ["--bench-steps must be >= 1, got 0"]),
    (["demo", "--generate", "-1"], ["--generate must be >= 1, got -1"]),
    (["demo", "--threads", "0"], ["--threads must be >= 1, got 0"]),
    (["serve-bench", "--threads", "0"], ["--threads"]),
    (["serve-bench", "--run-timeout", "-5"], ["--run-timeout must be a number of seconds > 0, got -5"]),
    (["serve-bench", "--run-timeout", "nan"], ["--run-timeout", "got nan"]),
    (["serve-bench", "--dtype", "bogus"], ["--dtype must be auto or one of", "'bogus'"]),
    (["serve-bench", "--request-rate", "fast"], ["--request-rate", "'fast'"]),
    (["bench", "--seed", str(10 ** 26)], ["--seed must be 0.."]),
    (["bench", "--routing", "--experts", "0"], ["--experts must be integers"]),
    (["bench", "--batch-sizes", str(10 ** 30)], ["--batch-sizes must be integers 1..1048576"]),
    (["eval", "--resamples", str(10 ** 12)], ["--resamples must be a number in 1..1e+06"]),
    (["tune", "--policy", "oea", "--resamples", str(10 ** 12)], ["--resamples must be a number in 1..1e+06"]),
    (["train-reference", "--balance-coef", "nan"], ["--balance-coef must be a number in 0..1e+06, got nan"]),
    (["train-reference", "--z-loss", "-1"], ["--z-loss must be a number in 0..1e+06, got -1"]),
    (["train-reference", "--revive-below", "inf"], ["--revive-below", "got inf"]),
    (["train-reference", "--balance-window", "0"], ["--balance-window must be >= 1, got 0"]),
    (["train-reference", "--stop-after", "0"], ["--stop-after must be >= 1, got 0"]),
])
def test_numbers_are_checked_first_and_name_their_option(tmp_path, capsys, nothing_loads, monkeypatch, argv, needles):
    import moe_reroute.reference.train as train

    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("training started"))
    out = ["--out", str(tmp_path / "out")] if argv[0] not in ("bench", "tune") else []
    if argv[0] == "train-reference":
        out += ["--workdir", str(tmp_path / "work")]
    bad_input(capsys, argv + out, *needles)
    assert not (tmp_path / "out").exists()


def test_an_offline_corpus_download_is_one_line(tmp_path, capsys, monkeypatch):
    """`pip download` failing (no network) ends train-reference with one line naming what to do."""
    import moe_reroute.reference.corpus as corpus
    import moe_reroute.reference.train as train

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(corpus.subprocess, "run", offline)
    monkeypatch.setattr(train, "train", lambda workdir, *a, **k: corpus.fetch_shakespeare(workdir))
    bad_input(capsys, ["train-reference", "--out", tmp_path / "m", "--workdir", tmp_path / "w"],
              "could not download", "Could not find a version", "place")

    def failing_tool(*a, **k):
        raise subprocess.CalledProcessError(2, ["dpkg-deb"])

    monkeypatch.setattr(train, "train", failing_tool)
    bad_input(capsys, ["train-reference", "--out", tmp_path / "m", "--workdir", tmp_path / "w"], "dpkg-deb")


SLOW_SYNTH = r"""
import sys, time
from pathlib import Path
import transformers

def save_pretrained(self, folder, **kwargs):  # writes shard 1 of 2, then takes its time over shard 2
    Path(folder, "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    Path(sys.argv[1]).touch()
    time.sleep(120)

transformers.PreTrainedModel.save_pretrained = save_pretrained
from moe_reroute.cli import main
sys.exit(main(["synth-model", "--shape", "qwen3-30b-a3b", "--layers", "2", "--dims", "64,32,8,2",
               "--out", sys.argv[2]]))
"""


def test_ctrl_c_is_one_line_130_and_leaves_no_partial_checkpoint(tmp_path):
    started, out = tmp_path / "started", tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SYNTH, str(started), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert started.exists(), proc.communicate(timeout=60)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "moe-reroute synth-model: interrupted; outputs are written complete or not at all", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started"]  # no shard 1 of 2, no temporary folder
