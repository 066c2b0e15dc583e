"""The real ``roma-train`` CLI end to end: config file + flags -> train -> push -> eval, and
the errors users see (bad config, bad patch, unreachable or refusing gateway).

The push target is a small real HTTP server (uvicorn, in a thread) that speaks the gateway's
``POST /routers`` contract: bearer token, multipart field ``patch``, OpenAI-style errors. The
service's own tests push to the real gateway.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from roma_patch import PatchError, read_patch
from roma_trainer.cli import app
from roma_trainer.push import PushError, push_patch

SAMPLE_FILE = Path(__file__).parents[2] / "trainer" / "data" / "sample.jsonl"
TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def error(status: int, message: str, code: str) -> JSONResponse:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return JSONResponse(body, status_code=status)


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[str, list[bytes]]]:
    received: list[bytes] = []
    api = FastAPI()

    @api.post("/routers")
    async def upload(request: Request):
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return error(401, "invalid admin token", "unauthorized")
        form = await request.form()
        data = await form["patch"].read()
        try:
            patch = read_patch(data)
        except PatchError as exc:
            return error(400, exc.message, exc.code)
        received.append(data)
        return JSONResponse({"id": patch.id, "version": len(received)}, status_code=201)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "test gateway did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", received
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = SAMPLE_FILE.read_text().splitlines()
    path = tmp_path_factory.mktemp("cli-data") / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines[::3]))  # 12 samples, all tasks
    return path


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


@pytest.mark.slow
def test_train_push_eval_end_to_end(
    tiny_olmoe: Path, small_data: Path, tmp_path: Path, gateway: tuple[str, list[bytes]]
) -> None:
    url, received = gateway
    config = tmp_path / "recipe.yaml"
    config.write_text(
        "objective: manifold\nk: 2\nlr: 0.5\nbatch_size: 6\nlayers: last2\nepochs: 1\n"
    )
    out = tmp_path / "patch.safetensors"
    result = invoke(
        "train", "--config", str(config), "--model", str(tiny_olmoe), "--data", str(small_data),
        "--out", str(out), "--lr", "0.01", "--seed", "3", "--push", url,
        env={"ROMA_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    patch = read_patch(out)
    assert patch.layers == [4, 5]
    assert patch.meta.hparams["k"] == 2  # from the file
    assert patch.meta.hparams["lr"] == 0.01  # the flag wins over the file
    assert patch.meta.hparams["seed"] == 3
    assert patch.meta.metrics["steps"] == 2
    assert received[-1] == out.read_bytes()
    assert patch.id in result.output.replace("\n", "")

    report_path = tmp_path / "eval.json"
    result = invoke(
        "eval", "--model", str(tiny_olmoe), "--data", str(small_data), "--patch", str(out),
        "--json", str(report_path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["patch"] == patch.id
    assert set(report["tasks"]) == {"antonyms", "arithmetic", "capitals"}
    assert report["average"]["n"] == 12
    assert "average" in result.output
    # The patched accuracy is what training measured at the end, on the same data.
    tasks = report["tasks"].values()
    micro = sum(t["acc"] * t["n"] for t in tasks) / 12
    assert micro == pytest.approx(patch.meta.metrics["train_acc_after"])


def test_push_errors_are_clear(
    gateway: tuple[str, list[bytes]], tmp_path: Path, tiny_olmoe: Path
) -> None:
    url, _ = gateway
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"definitely not safetensors")
    with pytest.raises(PushError, match=r"refused the admin token \(401\): invalid admin token"):
        push_patch(bogus, url, token="wrong")
    with pytest.raises(PushError, match=r"rejected the patch \(400\).*\[not_safetensors\]") as info:
        push_patch(bogus, url, token=TOKEN)
    assert info.value.status == 400
    with pytest.raises(PushError, match="could not reach the gateway"):
        push_patch(bogus, f"http://127.0.0.1:{free_port()}", token=TOKEN)
    with pytest.raises(PushError, match="ROMA_ADMIN_TOKEN is not set"):
        push_patch(bogus, url, token="")


@pytest.mark.slow
def test_train_push_failure_exits_1_and_keeps_the_patch(
    tiny_olmoe: Path, small_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.safetensors"
    result = invoke(
        "train", "--model", str(tiny_olmoe), "--data", str(small_data), "--out", str(out),
        "--objective", "ce", "--max-steps", "1", "--push", f"http://127.0.0.1:{free_port()}",
        env={"ROMA_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    assert result.exit_code == 1
    assert "could not reach the gateway" in result.output
    assert "the patch is saved at" in result.output
    read_patch(out)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--objective", "magic"], "objective"),
        (["--neighbours", "all"], "neighbours"),
        (["--layers", "first3"], "layers"),
        (["--k", "0"], "k:"),
        (["--token", "end"], "token"),
        (["--config", "/nonexistent/recipe.yaml"], "does not exist"),
    ],
    ids=["objective", "neighbours", "layers", "k", "token", "config-missing"],
)
def test_bad_options_exit_2(
    tiny_olmoe: Path, small_data: Path, args: list[str], words: str
) -> None:
    result = invoke("train", "--model", str(tiny_olmoe), "--data", str(small_data), *args)
    assert result.exit_code == 2, result.output
    assert words in result.output


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--grad-clip", "abc"], "'--grad-clip': 'abc' is not a float (or 'none')"),
        (["--grad-clip", "0"], "grad_clip: Input should be greater than 0"),
        (["--device", "nonsense"], "device: Value error, 'nonsense' is not a torch device"),
        (["--weight-decay", "-1"], "weight_decay: Input should be greater than or equal to 0"),
        (["--embed-batch-size", "0"], "embed_batch_size: Input should be greater than or equal"),
        (["--columns.prompt"], "Option '--columns.prompt' requires an argument"),
    ],
    ids=["grad-clip-word", "grad-clip-zero", "device", "weight-decay", "embed-batch", "dotted"],
)
def test_bad_values_of_the_new_flags_exit_2_with_the_reason(
    small_data: Path, args: list[str], reason: str
) -> None:
    result = invoke("train", "--data", str(small_data), *args)
    assert result.exit_code == 2, result.output
    assert reason in result.output


@pytest.mark.slow
def test_overrides_of_every_kind_reach_the_run(
    tiny_olmoe: Path, small_data: Path, tmp_path: Path
) -> None:
    """Keys that had no flag before (--grad-clip, --device, --weight-decay, --embed-batch-size,
    --hf-split, the columns), 'none' for an optional number, and the old --lambda alias: the
    patch's hparams are the config the recipe ran with."""
    config = tmp_path / "recipe.yaml"
    config.write_text("grad_clip: 3.0\nweight_decay: 0.5\ncolumns: {prompt: q, answer: a}\n")
    out = tmp_path / "p.safetensors"
    result = invoke(
        "train", "-c", str(config), "--model", str(tiny_olmoe), "--data", str(small_data),
        "--out", str(out), "--objective", "l2", "--max-steps", "1", "--grad-clip", "none",
        "--device", "cpu", "--weight-decay", "0.25", "--lambda", "0.5", "--embed-batch-size", "4",
        "--hf-split", "validation", "--columns.answer", "label", "--sigma", "0.7",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    hparams = read_patch(out).meta.hparams
    assert hparams["grad_clip"] is None  # 'none' beats the file's 3.0
    assert hparams["weight_decay"] == 0.25  # the flag beats the file
    assert hparams["device"] == "cpu"
    assert (hparams["lam"], hparams["sigma"], hparams["embed_batch_size"]) == (0.5, 0.7, 4)
    assert hparams["hf_split"] == "validation"
    assert hparams["columns"]["prompt"] == "q"  # from the file, beside the flag's answer
    assert hparams["columns"]["answer"] == "label"
    assert hparams["objective"] == "l2" and hparams["max_steps"] == 1


def test_unknown_config_key_exits_2(tiny_olmoe: Path, small_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 0.1\n")
    result = invoke("train", "--config", str(config), "--data", str(small_data))
    assert result.exit_code == 2
    assert "learning_rate" in result.output


def test_layer_without_router_exits_2(tiny_models: dict[str, Path], small_data: Path) -> None:
    """DeepSeek's layer 0 is dense: asking to tune it is a user error, not a crash."""
    result = invoke(
        "train",
        "--model",
        str(tiny_models["deepseek_v2"]),
        "--data",
        str(small_data),
        "--layers",
        "0,1",
    )
    assert result.exit_code == 2
    assert "[0] have no router" in result.output


def test_eval_with_a_bad_patch_exits_2(tiny_olmoe: Path, small_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"")
    result = invoke(
        "eval", "--model", str(tiny_olmoe), "--data", str(small_data), "--patch", str(bad)
    )
    assert result.exit_code == 2
    assert "the patch is empty" in result.output


def test_console_script_runs(tmp_path: Path) -> None:
    """The installed entry point, in a real subprocess."""
    exe = Path(sys.executable).parent / "roma-train"
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("train", "eval"):
        assert command in done.stdout
    missing = tmp_path / "missing.jsonl"
    done = subprocess.run(
        [str(exe), "eval", "--data", str(missing)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert f"{missing}: file does not exist" in done.stderr.replace("\n", "")
