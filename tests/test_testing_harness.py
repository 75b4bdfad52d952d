"""The test harness itself: the tiny model and process-tree cleanup."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rollstream import EngineStartError
from rollstream._supervise import group_members
from rollstream.testing import LocalVLLM, TinyModelSpec, need, tiny_model
from rollstream.testing.pytest_plugin import require_engine


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except OSError:
        return False


def test_tiny_model_is_deterministic_and_complete(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = tiny_model(tmp_path / "m")
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (again / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    cfg = json.loads((again / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert cfg[key] == getattr(TinyModelSpec, key), key
    from tokenizers import Tokenizer

    # Every embedding row is reachable from the tokenizer, and every token has one.
    assert cfg["vocab_size"] == Tokenizer.from_file(str(again / "tokenizer.json")).get_vocab_size()


def test_tiny_model_tokenizer_is_real_qwen_bpe(tiny_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == TinyModelSpec.vocab_size
    # Ids of Qwen's vocabulary for a ChatML prompt (same as Qwen3-0.6B).
    ids = tok.encode("<|im_start|>user\nHello! How are you today?<|im_end|>\n").ids
    assert ids == [151644, 872, 198, 9707, 0, 2585, 525, 498, 3351, 30, 151645, 198]


def test_tiny_model_loads_in_transformers(tiny_model_dir: Path) -> None:
    torch = need("torch")
    transformers = need("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([[151644, 872, 198]])).logits
    assert out.shape == (1, 3, TinyModelSpec.vocab_size)
    # Tied embeddings: the head is the embedding matrix.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    std = float(out[0, -1].std())
    assert 0.5 < std < 10, f"logit spread {std} makes sampling degenerate"


def _spawn_tree_under_supervisor(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A parent process that supervises a small process tree (stand-in for
    vLLM's api server + engine core), then reports the pids."""
    pids = tmp_path / "pids"
    tree = textwrap.dedent(
        f"""
        import subprocess, sys, time, os
        kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(2)]
        open({str(pids)!r}, "w").write(" ".join(str(p) for p in [os.getpid()] + [k.pid for k in kids]))
        time.sleep(600)
        """
    )
    owner = textwrap.dedent(
        f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-m", "rollstream._supervise", "--",
                              sys.executable, "-c", {tree!r}], stdin=subprocess.PIPE, start_new_session=True)
        print(p.pid, flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE)
    return proc, pids


def test_supervisor_kills_tree_when_owner_is_killed(tmp_path: Path) -> None:
    owner, pids_file = _spawn_tree_under_supervisor(tmp_path)
    assert owner.stdout is not None
    supervisor = int(owner.stdout.readline())
    deadline = time.monotonic() + 30
    while not (pids_file.exists() and pids_file.read_text().strip()):
        assert time.monotonic() < deadline, "tree did not start"
        time.sleep(0.05)
    pids = [int(p) for p in pids_file.read_text().split()]
    assert all(_alive(p) for p in pids)
    owner.send_signal(signal.SIGKILL)  # a crashed test process
    owner.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in [*pids, supervisor]):
        assert time.monotonic() < deadline, (
            f"processes survived their owner: {[p for p in pids if _alive(p)]}"
        )
        time.sleep(0.1)


def test_local_vllm_start_failure_reports_log_tail(tmp_path: Path) -> None:
    require_engine()
    server = LocalVLLM(tmp_path / "no-such-model", startup_timeout=300)
    with pytest.raises(EngineStartError) as info:
        server.start()
    msg = str(info.value)
    assert "exited with code" in msg
    assert "no-such-model" in msg  # the log tail names the bad path
    assert not server.running
    assert server.pid is None
    assert server.pgid is not None
    assert group_members(server.pgid) == [], "engine processes outlived a failed start"


def test_session_server_runs_in_its_own_process_group(vllm_server: LocalVLLM) -> None:
    assert vllm_server.running
    assert vllm_server.pgid == vllm_server.pid
    members = group_members(vllm_server.pgid)
    # supervisor + api server + engine core (at least)
    assert len(members) >= 3, members


def test_need_imports_skips_or_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    assert need("json") is json
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("ROLLSTREAM_REQUIRE_ENGINE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="rollstream_no_such_module"):
        need("rollstream_no_such_module")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true forbids skipping"):
        need("rollstream_no_such_module")
