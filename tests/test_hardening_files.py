"""Inputs are read from regular files only, up to a size limit; policy files are JSON objects (a BOM is
fine, an array is not); trace headers must agree with their tensors."""

import json
import os
import stat
import threading

import pytest
import torch

from moe_reroute.contract import RouterSpec
from moe_reroute.policies import load_policy
from moe_reroute.traces import Trace, load, replay_file


def char_device(path):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 5))  # what /dev/zero is, in the test's own folder
    return path


def no_hang(fn, seconds=60):
    """Run fn() in a thread; fail (rather than hang the suite) when it has not returned in time."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the read blocked"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_policy_file_holding_an_array_or_bom(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('[{"name": "oea", "k0": 3}]')
    with pytest.raises(ValueError, match=f"{f}: the JSON holds an array, not an object"):
        load_policy(f)
    f.write_bytes(b"\xef\xbb\xbf" + b'{"name": "oea", "k0": 3}')  # UTF-8 with a byte-order mark
    assert load_policy(f).name == "oea"
    f.write_text('"oea"')
    with pytest.raises(ValueError, match="holds a string, not an object"):
        load_policy(f)
    from moe_reroute.policies import parse_policy_spec

    with pytest.raises(ValueError, match="JSON that is not an object"):  # what the engine plugins parse
        parse_policy_spec('[{"name": "oea", "k0": 3}]')
    from moe_reroute.vllm import config

    f.write_text('[{"name": "oea", "k0": 3}]')
    with pytest.raises(ValueError, match="MOE_REROUTE_POLICY_FILE.*JSON that is not an object"):
        config.from_env({"MOE_REROUTE_POLICY_FILE": str(f)})


def test_policy_file_engine_options_backend_and_ties(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"name": "oea", "k0": 3, "backend": "torch", "ties": "lower-id"}')
    policy = load_policy(f)
    assert (policy.backend, policy.ties) == ("torch", "lower-id")
    f.write_text('{"name": "oea", "k0": 3, "backend": "gpu"}')
    with pytest.raises(ValueError, match=f"{f}: backend must be one of"):
        load_policy(f)


def test_a_missing_file_is_a_file_not_found_error_and_a_value_error(tmp_path):
    """As docs/errors.md says: a loader's missing file raises FileNotFoundError, which callers that catch the
    loaders' ValueError also catch."""
    from moe_reroute.measure.tasks import load_jsonl
    from moe_reroute.placement import read_placement_json

    for reader in (load_policy, load_jsonl, read_placement_json):
        for kind in (FileNotFoundError, ValueError):
            with pytest.raises(kind, match=f"{tmp_path / 'nope'}: no such file"):
                reader(tmp_path / "nope")


def test_special_files_are_named_for_what_they_are(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=f"{fifo} is a FIFO"):
        no_hang(lambda: load_policy(fifo))
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder"):
        load_policy(tmp_path)
    zero = char_device(tmp_path / "zero")
    with pytest.raises(ValueError, match=f"{zero} is a device"):
        no_hang(lambda: load_policy(zero))


def test_oversized_policy_file_is_refused_unread(tmp_path):
    from moe_reroute.policies.spec import POLICY_FILE_BYTES

    f = tmp_path / "big.json"
    with open(f, "wb") as out:
        out.truncate(POLICY_FILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(ValueError, match="more than the 64 MiB read at most"):
        load_policy(f)


def test_text_task_and_safetensors_readers_refuse_fifos_and_devices(tmp_path, capsys):
    from cli_helpers import bad_input
    from moe_reroute.hf.calibrate import load_similarity
    from moe_reroute.measure.tasks import load_jsonl

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=f"{fifo} is a FIFO"):
        no_hang(lambda: load_jsonl(fifo))
    with pytest.raises(ValueError, match=f"{fifo} is a FIFO"):
        no_hang(lambda: load_similarity(fifo))
    with pytest.raises(ValueError, match=f"{fifo} is a FIFO"):
        no_hang(lambda: load(fifo))
    from moe_reroute.policies import make_policy

    with pytest.raises(ValueError, match=f"{fifo} is a FIFO"):
        no_hang(lambda: replay_file(fifo, make_policy("native")))
    no_hang(lambda: bad_input(capsys, ["calibrate", "--text", fifo, "--out", tmp_path / "s.safetensors"],
                              f"--text {fifo} is a FIFO"))
    zero = char_device(tmp_path / "zero")
    with pytest.raises(ValueError, match=f"{zero} is a device"):
        no_hang(lambda: load_jsonl(zero))
    no_hang(lambda: bad_input(capsys, ["eval", "--task", zero], f"--task {zero} is a device"))


def _trace_file(tmp_path, logits_dtype=torch.float32, **header_changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    trace = Trace({0: torch.randn(3, 2, 8)}, torch.ones(3, 2, dtype=torch.bool), {0: RouterSpec(8, 2)})
    path = trace.save(tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["moe_reroute"])
    tensors["logits.0"] = tensors["logits.0"].to(logits_dtype)
    header.update(header_changes)
    save_file(tensors, str(path), metadata={"moe_reroute": json.dumps(header)})
    return path


@pytest.mark.parametrize("changes,needle", [
    ({"steps": 5}, "header field 'steps' is 5 but the tensors hold 3"),
    ({"batch_size": 64}, "header field 'batch_size' is 64 but the tensors hold 2"),
    ({"batch_size": True}, "header field 'batch_size' is True"),
    ({"dtype": "bfloat16"}, "the header says dtype bfloat16 but the logits are float32"),
    ({"dtype": "int8"}, "header field 'dtype' is 'int8'"),
])
def test_trace_headers_must_agree_with_the_tensors(tmp_path, changes, needle):
    from moe_reroute.policies import make_policy

    path = _trace_file(tmp_path, **changes)
    with pytest.raises(ValueError, match=needle):
        load(path)
    with pytest.raises(ValueError, match=needle):
        replay_file(path, make_policy("native"))


def test_float8_trace_logits_are_refused_cleanly(tmp_path):
    path = _trace_file(tmp_path, logits_dtype=torch.float8_e4m3fn, dtype="float32")
    with pytest.raises(ValueError, match=r"must be floating point router logits \(float64, float32, float16, bfloat16\), got float8_e4m3fn"):
        load(path)
