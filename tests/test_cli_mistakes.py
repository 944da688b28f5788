"""Every expected mistake at the command line: exit 2, one line `medlego <cmd>: error: …` on stderr, no
traceback, and found before any expensive work. MEDLEGO_DEBUG=1 shows the traceback instead.

Most cases run `medlego.cli.main` in this process (a new interpreter per case would spend seconds
importing torch); the ones that change process-wide state, or that check the installed entry
point itself, run as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import TINY_MODEL
from medlego.cli import main
from medlego.jobs.synthetic import make_synthetic_medmnist, random_adapter

BASE = ["--model", TINY_MODEL]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_base, tiny_base_file):
    d = tmp_path_factory.mktemp("mistakes")
    adapter = d / "blood.safetensors"
    adapter.write_bytes(random_adapter(tiny_base.spec, tiny_base.preprocess, seed=1).to_bytes())
    (d / "notes.txt").write_text("not an image, not weights\n")
    make_synthetic_medmnist(d / "blood.npz", classes=3, n_train=8, n_val=4, n_test=4)
    return {"dir": d, "base": str(tiny_base_file), "adapter": str(adapter), "text": str(d / "notes.txt"),
            "data": str(d / "blood.npz")}


def run(capfd, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capfd.readouterr()
    return int(rc or 0), out, err


def one_line(rc: int, err: str, command: str, *needles: str) -> str:
    assert rc == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"medlego {command}: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# -- the base -------------------------------------------------------------------------------------
def test_a_base_name_that_does_not_fit_the_weights_names_both(capfd, files):
    rc, _, err = run(capfd, "base", "info", "--model", "vit_small_patch16_224", "--weights", files["base"])
    one_line(rc, err, "base", "vit_small_patch16_224", files["base"], "made for vit_tiny_patch16_224",
             "width 192", "width 384", "use --model vit_tiny_patch16_224")


def test_a_missing_weights_file(capfd, files):
    rc, _, err = run(capfd, "base", "fingerprint", *BASE, "--weights", "nowhere.safetensors")
    one_line(rc, err, "base", "weights file not found: nowhere.safetensors")


def test_a_text_file_as_weights(capfd, files):
    weights = files["dir"] / "base.pth"
    weights.write_text("hello\n")
    rc, _, err = run(capfd, "base", "fingerprint", *BASE, "--weights", str(weights))
    one_line(rc, err, "base", f"{weights} is not a weights file")


def test_an_adapter_as_weights(capfd, files):
    rc, _, err = run(capfd, "base", "info", *BASE, "--weights", files["adapter"])
    one_line(rc, err, "base", "is a medlego adapter, not base weights: pass it as --adapter")


def test_an_unreachable_hub_fails_fast(files, tmp_path):
    # nothing listens on port 9; a fresh cache holds nothing: without offline mode the hub client retries
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "medlego", "base", "info", *BASE, "--pretrained"], env=env,
                       capture_output=True, text=True, timeout=120)
    one_line(r.returncode, r.stderr, "base", "cannot load pretrained 'vit_tiny_patch16_224'",
             "http://127.0.0.1:9", "not in its local cache", "--weights FILE")
    assert time.monotonic() - t0 < 60  # interpreter start and imports included; the hub part is seconds


# -- files the commands read ----------------------------------------------------------------------
def test_a_missing_image_is_found_before_the_base_loads(capfd, files):
    rc, _, err = run(capfd, "predict", *BASE, "--weights", "no-such-base.safetensors", "--adapter", files["adapter"],
                     "scan.png")
    one_line(rc, err, "predict", "scan.png: No such file or directory")


def test_a_folder_as_image(capfd, files):
    rc, _, err = run(capfd, "predict", *BASE, "--weights", files["base"], "--adapter", files["adapter"],
                     str(files["dir"]))
    one_line(rc, err, "predict", f"{files['dir']}: Is a directory")


def test_an_image_that_is_not_one_names_the_file(capfd, files):
    rc, _, err = run(capfd, "predict", *BASE, "--weights", files["base"], "--adapter", files["adapter"], files["text"])
    one_line(rc, err, "predict", f"{files['text']}: ", "PNG, JPEG or DICOM")


def test_a_missing_adapter_file(capfd, files):
    rc, _, err = run(capfd, "predict", *BASE, "--weights", "no-such-base.safetensors", "--adapter",
                     "derma-v2.safetensors", files["text"])
    one_line(rc, err, "predict", "derma-v2.safetensors: No such file or directory")


def test_an_unknown_registered_adapter_suggests_close_names(capfd, files, tiny_base):
    from medlego.runtime.registry import Registry

    data_dir = files["dir"] / "registry"
    Registry(data_dir, base=tiny_base.spec).register("blood", open(files["adapter"], "rb").read())
    rc, _, err = run(capfd, "inspect", "bloood", "--data-dir", str(data_dir))
    one_line(rc, err, "inspect", "unknown adapter 'bloood'; did you mean blood?")


def test_missing_training_data(capfd, files):
    rc, _, err = run(capfd, "train", *BASE, "--weights", files["base"], "--data", "bloodmnist.npz", "--task", "blood",
                     "-o", str(files["dir"] / "out.safetensors"))
    one_line(rc, err, "train", "dataset not found: bloodmnist.npz")


def test_missing_eval_data(capfd, files):
    rc, _, err = run(capfd, "eval", *BASE, "--weights", files["base"], "--adapter", files["adapter"], "--data",
                     "nowhere.npz")
    one_line(rc, err, "eval", "dataset not found: nowhere.npz")


# -- training: names, labels and the device before any work ----------------------------------------
@pytest.mark.parametrize("task, labels, message", [
    ("blood cells", None, "task name 'blood cells' must be letters, digits, '_' or '-'"),
    ("blood.v2", None, "task name 'blood.v2' must be"),
    ("blood", "a,b,a", "label(s) a given more than once"),
    ("blood", "a,,b", "a label is empty"),
])
def test_invalid_task_names_and_labels_stop_before_training(capfd, files, task, labels, message):
    out = files["dir"] / "never.safetensors"
    # the base named does not exist: the name is refused before anything is loaded, let alone trained
    argv = ["train", *BASE, "--weights", "no-such-base.safetensors", "--data", files["data"], "--task", task,
            "-o", str(out), *(["--labels", labels] if labels else [])]
    rc, _, err = run(capfd, *argv)
    one_line(rc, err, "train", message)
    assert not out.exists() and not (files["dir"] / "never.safetensors.work").exists()


def test_labels_that_do_not_fit_the_data_stop_before_training(capfd, files):
    rc, _, err = run(capfd, "train", *BASE, "--weights", files["base"], "--data", files["data"], "--task", "blood",
                     "--labels", "only-one", "-o", str(files["dir"] / "x.safetensors"))
    one_line(rc, err, "train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA accepts --device cuda")
def test_cuda_without_cuda_is_refused_before_any_work(capfd, files):
    # the data named does not exist: the device is refused first, before data or base are touched
    rc, _, err = run(capfd, "train", *BASE, "--weights", files["base"], "--data", "not-there.npz", "--task", "blood",
                     "--device", "cuda", "-o", str(files["dir"] / "x.safetensors"))
    one_line(rc, err, "train", "--device cuda: CUDA is not available on this machine", "use --device cpu")
    rc, _, err = run(capfd, "serve", *BASE, "--weights", "no-such-base.safetensors", "--data-dir", str(files["dir"]),
                     "--device", "cuda:1")
    one_line(rc, err, "serve", "--device cuda:1: CUDA is not available")


def test_a_device_that_is_not_one(capfd, files):
    rc, _, err = run(capfd, "train", *BASE, "--weights", files["base"], "--data", files["data"], "--task", "blood",
                     "--device", "gpu", "-o", str(files["dir"] / "x.safetensors"))
    one_line(rc, err, "train", "--device gpu: not a device (use cpu, cuda or cuda:N)")


# -- serving ----------------------------------------------------------------------------------------
def test_a_port_in_use_is_found_before_the_base_loads(capfd, files):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, out, err = run(capfd, "serve", *BASE, "--weights", "no-such-base.safetensors", "--data-dir",
                           str(files["dir"]), "--port", str(port), "--no-grpc")
    one_line(rc, err, "serve", f"cannot listen on 127.0.0.1:{port}: Address already in use", "choose another --port")
    assert out == ""  # no "serving …" banner before the failure


@pytest.mark.parametrize("value", ["0", "-1", "500"])
def test_a_switch_interval_out_of_range_is_found_before_the_base_loads(capfd, files, tmp_path, value):
    config = tmp_path / "serve.toml"
    config.write_text(f"[server]\nswitch_interval_ms = {value}\n")
    rc, out, err = run(capfd, "serve", *BASE, "--weights", "no-such-base.safetensors", "--data-dir",
                       str(files["dir"]), "--config", str(config), "--no-grpc")
    one_line(rc, err, "serve", "[server] switch_interval_ms must be above 0 and at most 100")
    assert out == ""


def test_direct_ingress_without_ray_is_one_line(capfd, files):
    rc, _, err = run(capfd, "serve", *BASE, "--weights", "no-such-base.safetensors", "--data-dir", str(files["dir"]),
                     "--direct-ingress", "--no-grpc", "--port", "0")
    one_line(rc, err, "serve", "--direct-ingress is a setting of the Ray deployment: add --ray")


def test_a_grpc_port_in_use(capfd, files):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, _, err = run(capfd, "serve", *BASE, "--weights", files["base"], "--data-dir", str(files["dir"]),
                         "--port", "0", "--grpc-port", str(port))
    one_line(rc, err, "serve", f"cannot listen on 127.0.0.1:{port}", "choose another --grpc-port")


def test_a_client_without_a_server(capfd):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err = run(capfd, "client", "list", "--http", f"http://127.0.0.1:{port}")
    one_line(rc, err, "client", f"cannot reach http://127.0.0.1:{port}", "is `medlego serve` running there?")


# -- argparse, the entry point, and MEDLEGO_DEBUG ---------------------------------------------------
def test_a_flag_typo_shows_the_subcommand_s_usage_and_the_flag_meant(capfd, files):
    rc, _, err = run(capfd, "predict", *BASE, "--weights", files["base"], "--adapter", files["adapter"], "--josn",
                     "scan.png")
    assert rc == 2 and err.startswith("usage: medlego predict ") and "Traceback" not in err
    assert err.splitlines()[-1] == "medlego predict: error: unrecognized arguments: --josn (did you mean --json?)"


def test_the_installed_command_prints_one_line(files):
    r = subprocess.run(["medlego", "base", "info", "--model", "vit_small_patch16_224", "--weights", files["base"]],
                       capture_output=True, text=True, timeout=120)
    one_line(r.returncode, r.stderr, "base", "does not fit 'vit_small_patch16_224'")
    assert r.stdout == ""


def test_medlego_debug_shows_the_traceback(capfd, files, monkeypatch):
    from medlego.runtime.errors import BaseModelError

    monkeypatch.setenv("MEDLEGO_DEBUG", "1")
    with pytest.raises(BaseModelError, match="weights file not found"):
        main(["base", "fingerprint", *BASE, "--weights", "nowhere.safetensors"])


# -- registry flags before or after the action (issue 25) ------------------------------------------
@pytest.mark.parametrize("argv", [
    ("audit", "verify", "--data-dir", "{d}"), ("audit", "--data-dir", "{d}", "verify"),
    ("audit", "export", "--data-dir", "{d}"), ("registry", "list", "--data-dir", "{d}"),
    ("registry", "--data-dir", "{d}", "list"), ("registry", "show", "x", "--data-dir", "{d}", "--registry", "sqlite")])
def test_registry_flags_work_on_both_sides_of_the_action(capfd, tmp_path, argv):
    from medlego.runtime.registry import Registry

    Registry(tmp_path)  # an empty registry: the database exists
    rc, out, err = run(capfd, *[a.format(d=tmp_path) for a in argv])
    assert "unrecognized arguments" not in err, err
    if argv[1:3] == ("show", "x"):
        one_line(rc, err, "registry", "x")  # found the registry, not the name
    else:
        assert rc == 0, err


def test_audit_mistakes_print_one_line(capfd, tmp_path):
    from medlego.runtime.registry import Registry

    Registry(tmp_path)
    one_line(*run(capfd, "audit", "verify", "--data-dir", str(tmp_path / "none"))[::2], "audit", "no registry database")
    one_line(*run(capfd, "audit", "verify", "--data-dir", str(tmp_path), "--public-key", str(tmp_path / "nope.pub"))[::2],
             "audit", "nope.pub")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a key\n")
    one_line(*run(capfd, "audit", "verify", "--data-dir", str(tmp_path), "--public-key", str(notes))[::2],
             "audit", "not a PEM public key")
    rc, out, err = run(capfd, "audit", "keygen", "-o", str(tmp_path / "k"))
    assert rc == 0 and oct((tmp_path / "k").stat().st_mode & 0o777) == "0o600" and (tmp_path / "k.pub").is_file()
    one_line(*run(capfd, "audit", "keygen", "-o", str(tmp_path / "k"))[::2], "audit", "already exists")
    one_line(*run(capfd, "audit", "prune", "--data-dir", str(tmp_path), "--before", "2020-01-01", "--signing-key",
                  str(tmp_path / "k.pub"))[::2], "audit", "not a PEM private key")
