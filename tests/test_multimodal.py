"""Images and audio through llama.cpp's libmtmd (pyllama.Projector): a tiny random-weight text model with
a matching tiny Gemma 3 vision projector and Ultravox audio projector (tests/tiny_models.py), and
llama.cpp's own media (tools/mtmd/test-1.jpeg, test-2.mp3). The truth is llama.cpp's llama-mtmd-cli,
built from the same sources with the same flags into the build tree (PYLLAMA_TEST_TOOLS); the greedy
loops here pick tokens by numpy's argmax of the logits."""

from __future__ import annotations

import base64
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pyllama

from tiny_models import LLAMA_CPP, write_tiny_llama, write_tiny_mmproj_audio, write_tiny_mmproj_vision

ROOT = Path(__file__).resolve().parent.parent
IMAGE = LLAMA_CPP / "tools" / "mtmd" / "test-1.jpeg"
AUDIO = LLAMA_CPP / "tools" / "mtmd" / "test-2.mp3"
MARKER = pyllama.Projector.default_marker()


def chatml(content: str) -> str:
    """What llama-mtmd-cli renders for one user message with --chat-template chatml."""
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mm")
    return {
        "text": write_tiny_llama(d / "text.gguf", n_embd=64, name="tiny-mm"),
        "vision": write_tiny_mmproj_vision(d / "vision.gguf", text_n_embd=64),
        "audio": write_tiny_mmproj_audio(d / "audio.gguf", text_n_embd=64),
        "other": write_tiny_mmproj_vision(d / "vision96.gguf", text_n_embd=96),
    }


@pytest.fixture(scope="module")
def model(files: dict[str, Path]) -> Any:
    with pyllama.Model(str(files["text"])) as m:
        yield m


@pytest.fixture(scope="module")
def mtmd_cli() -> Path:
    tools = sorted(ROOT.glob("build/*/test-tools/llama-mtmd-cli"))
    if not tools:  # pragma: no cover
        pytest.skip("llama-mtmd-cli is not in the build tree (built unless -DPYLLAMA_TEST_TOOLS=OFF)")
    return tools[-1]


def greedy(model: pyllama.Model, proj: pyllama.Projector, chunks: list[pyllama.Chunk], n: int) -> list[int]:
    """n greedy tokens after the chunks, by numpy's argmax, one decode at a time."""
    with pyllama.Context(model, n_ctx=1024, n_threads=2) as ctx:
        n_past = proj.eval(ctx, chunks)
        out: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(ctx.logits()))
            out.append(tok)
            if model.token_is_eog(tok):
                break
            ctx.decode(pyllama.Batch.from_tokens([tok], pos0=n_past))
            n_past += 1
        return out


def cli_text(cli: Path, files: dict[str, Path], projector: str, flag: str, media: Path, n: int) -> str:
    """llama-mtmd-cli's greedy reply (what it prints between its opening newline and closing ones)."""
    run = subprocess.run(
        [
            str(cli),
            *("-m", str(files["text"]), "--mmproj", str(files[projector]), flag, str(media)),
            *("-p", "Describe this.", "-n", str(n), "--temp", "0", "-t", "2", "--chat-template", "chatml"),
        ],
        capture_output=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    out = run.stdout.decode()
    assert out.startswith("\n") and out.endswith("\n\n"), out
    return out[1:-2]


@pytest.mark.parametrize(("projector", "flag", "media"), [("vision", "--image", IMAGE), ("audio", "--audio", AUDIO)])
def test_greedy_tokens_after_media_equal_llama_mtmd_cli(
    files: dict[str, Path], model: pyllama.Model, mtmd_cli: Path, projector: str, flag: str, media: Path
) -> None:
    """The media is decoded, tokenised into chunks, encoded and evaluated as llama-mtmd-cli does it: the
    greedy reply is the same text; without the media it is another one."""
    with pyllama.Projector(model, str(files[projector]), n_threads=2) as proj:
        m = proj.media_from_file(str(media))
        chunks = proj.tokenize(chatml(MARKER + "Describe this."), [m])
        kinds = [c.type for c in chunks]
        assert kinds.count("image" if projector == "vision" else "audio") == 1
        tokens = greedy(model, proj, chunks, 10)
        without = greedy(model, proj, proj.tokenize(chatml("Describe this.")), 10)
    text = str(model.detokenize(tokens))
    assert text.strip() and text.lstrip() == cli_text(mtmd_cli, files, projector, flag, media, 10).lstrip()
    assert tokens != without


def test_chunks_media_and_embeddings(files: dict[str, Path], model: pyllama.Model) -> None:
    """Chunks say what they are; a media's id is the same for the same bytes; an image's embeddings are
    (n_tokens, n_embd), the same each time, and what eval() decodes (the logits after them equal those
    after decoding the embeddings by hand, as a batch of embeddings with non-causal attention)."""
    with pyllama.Projector(model, str(files["vision"]), n_threads=2) as proj:
        assert proj.supports_vision and not proj.supports_audio and proj.audio_sample_rate is None
        assert proj.n_embd == model.n_embd
        data = IMAGE.read_bytes()
        a, b = proj.media(data), proj.media_from_file(str(IMAGE))
        assert (a.kind, a.nx, a.ny, a.n_samples) == ("image", 640, 488, 0) and a.id == b.id
        chunks = proj.tokenize(chatml(MARKER + "Describe this."), [a])
        text0, image, text1 = chunks
        assert (text0.type, image.type, text1.type) == ("text", "image", "text")
        assert image.id == a.id and text0.id is None and image.tokens is None
        # the text before the marker, then Gemma 3's image opener (tokenised on its own, as mtmd does)
        head = list(model.tokenize("<|im_start|>user\n")) + list(model.tokenize("<start_of_image>", add_special=False))
        assert text0.tokens == head
        n0 = proj.n_encoded
        emb = proj.encode(image)
        assert emb.shape == (image.n_tokens, model.n_embd) and emb.dtype == np.float32
        assert np.array_equal(emb, proj.encode(image)) and proj.n_encoded == n0 + 2
        with pyllama.Context(model, n_ctx=512, n_threads=2) as ctx:
            assert proj.eval(ctx, chunks) == sum(c.n_tokens for c in chunks)
            want = ctx.logits().copy()
        with pyllama.Context(model, n_ctx=512, n_threads=2) as ctx:
            ctx.decode(pyllama.Batch.from_tokens(text0.tokens))
            n = len(text0.tokens)
            ctx.set_causal_attn(False)
            ctx.decode(pyllama.Batch.from_embeddings(emb, pos0=n, logits_last=False))
            ctx.set_causal_attn(True)
            n += image.n_tokens
            ctx.decode(pyllama.Batch.from_tokens(text1.tokens, pos0=n))
            np.testing.assert_allclose(ctx.logits(), want, rtol=1e-4, atol=1e-4)
    with pyllama.Projector(model, str(files["audio"]), n_threads=2) as proj:
        assert proj.supports_audio and not proj.supports_vision and proj.audio_sample_rate == 16000
        clip = proj.media_from_file(str(AUDIO))
        assert clip.kind == "audio" and clip.n_samples > 16000 and (clip.nx, clip.ny) == (0, 0)


def png_image(width: int, height: int) -> bytes:
    """A real PNG of width x height pixels, a colour gradient."""
    rows = b"".join(
        b"\0" + bytes(v for x in range(width) for v in (x * 255 // width, y * 255 // height, 128))
        for y in range(height)
    )
    return _png(width, height, zlib.compress(rows))


def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (its one IDAT holds a single row)."""
    return _png(width, height, zlib.compress(b"\0" * 8))


def test_bad_media_and_projectors_are_refused(files: dict[str, Path], model: pyllama.Model, tmp_path: Path) -> None:
    """Not an image, a truncated JPEG, a decompression bomb (a PNG header of 60,000 x 60,000), audio for
    a vision projector, a projector for a model of another width, a file that is not a projector, markers
    and media that do not match: each a typed error, and the projector still works afterwards."""
    with pyllama.Projector(model, str(files["vision"]), n_threads=2) as proj:
        with pytest.raises(ValueError):
            proj.media(b"this is not an image at all, just some text")
        with pytest.raises(ValueError):
            proj.media(b"")
        with pytest.raises(ValueError):
            proj.media(IMAGE.read_bytes()[:2000])
        for width, height in ((60_000, 60_000), (12_000, 12_000)):  # refused before anything is decoded
            with pytest.raises(ValueError):
                proj.media(png_header(width, height))
        with pytest.raises(ValueError):
            proj.media(AUDIO.read_bytes())  # no audio encoder
        with pytest.raises(ValueError):
            proj.media(base64.b64decode(base64.b64encode(b"GIF89a" + b"\0" * 5)))
        with pytest.raises(FileNotFoundError):
            proj.media_from_file(str(tmp_path / "missing.jpg"))
        with pytest.raises(ValueError):
            proj.media(IMAGE.read_bytes(), max_pixels=1000)
        image = proj.media(IMAGE.read_bytes())
        with pytest.raises(pyllama.InvalidRequestError):
            proj.tokenize(chatml("no marker"), [image])
        with pytest.raises(pyllama.InvalidRequestError):
            proj.tokenize(chatml(MARKER + MARKER), [image])
        with pytest.raises(ValueError):
            proj.encode(proj.tokenize(chatml("text only"))[0])
        many = proj.tokenize(chatml(MARKER * 20 + "Describe these."), [image] * 20)  # 20 x 16 media tokens
        with pyllama.Context(model, n_ctx=256, n_threads=2) as small:  # more media than the context holds
            assert sum(c.n_tokens for c in many) > small.n_ctx
            with pytest.raises(pyllama.LlamaError):
                proj.eval(small, many)
            assert small.seq_pos_max(0) == -1  # cut back to where it started
            chunks = proj.tokenize(chatml(MARKER + "Describe this."), [image])
            assert proj.eval(small, chunks) == sum(c.n_tokens for c in chunks)
    with pytest.raises(pyllama.ModelLoadError):
        pyllama.Projector(model, str(files["other"]))  # 96 wide, the model 64
    with pytest.raises(pyllama.ModelLoadError):
        pyllama.Projector(model, str(files["text"]))  # a model, not a projector
    with pytest.raises(FileNotFoundError):
        pyllama.Projector(model, str(tmp_path / "missing.gguf"))
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"junk" * 100)
    with pytest.raises(pyllama.ModelLoadError):
        pyllama.Projector(model, str(not_gguf))


# --- through the generation core (pyllama.Engine) ------------------------------------------------


def engine_greedy(
    engine: pyllama.Engine, model: pyllama.Model, proj: pyllama.Projector, chunks: list[pyllama.Chunk], n: int
) -> pyllama.EngineRequest:
    return engine.submit(chunks, pyllama.Sampler(model, temperature=0.0), max_tokens=n, ignore_eos=True, projector=proj)


def loop_greedy(model: pyllama.Model, proj: pyllama.Projector, chunks: list[pyllama.Chunk], n: int) -> list[int]:
    """n greedy tokens after the chunks, ignoring end of generation (as ignore_eos does)."""
    with pyllama.Context(model, n_ctx=1024, n_threads=2) as ctx:
        n_past = proj.eval(ctx, chunks)
        out: list[int] = []
        for _ in range(n):
            out.append(int(np.argmax(ctx.logits())))
            ctx.decode(pyllama.Batch.from_tokens([out[-1]], pos0=n_past))
            n_past += 1
        return out


@pytest.mark.parametrize("n_parallel", [1, 3])
def test_the_engine_takes_media_in_prompts(files: dict[str, Path], model: pyllama.Model, n_parallel: int) -> None:
    """Prompts with an image (in the middle, and at the very end, where the first token is sampled
    from the image's last position) and with audio, next to a text-only prompt, through one engine
    (together when n_parallel=3): each request's greedy tokens are those of the low-level loop alone,
    and its prompt tokens count each media chunk's tokens."""
    with (
        pyllama.Projector(model, str(files["vision"]), n_threads=2) as vision,
        pyllama.Projector(model, str(files["audio"]), n_threads=2) as audio,
    ):
        image = vision.media_from_file(str(IMAGE))
        clip = audio.media_from_file(str(AUDIO))
        prompts = [
            (vision, vision.tokenize(chatml(MARKER + "Describe this."), [image])),
            (vision, vision.tokenize("An image: " + MARKER, [image])),  # ends with the image
            (audio, audio.tokenize(chatml("Listen: " + MARKER), [clip])),
            (vision, vision.tokenize(chatml("Only text here."))),
        ]
        truth = [loop_greedy(model, p, chunks, 8) for p, chunks in prompts]
        with pyllama.Context(model, n_ctx=1024 * n_parallel, n_seq_max=n_parallel, n_threads=2) as ctx:
            engine = pyllama.Engine(ctx, n_parallel)
            reqs = [engine_greedy(engine, model, p, chunks, 8) for p, chunks in prompts]
            for r in reqs:
                r.run()
            engine.close()
        for r, (_, chunks), want in zip(reqs, prompts, truth, strict=True):
            assert r.finish_reason == "length"
            assert r.n_prompt == sum(c.n_tokens for c in chunks)
            assert r.completion_tokens == want


def test_a_media_chunk_in_a_reused_prefix_is_not_encoded_again(files: dict[str, Path], model: pyllama.Model) -> None:
    """A second turn about the same image reuses the first turn's prefix, image included: the image is
    not encoded again, and the reply is the one of evaluating the whole second prompt afresh. Another
    image at the same place is encoded (its id differs), and the prefix stops where the images part."""
    with pyllama.Projector(model, str(files["vision"]), n_threads=2) as proj:
        image = proj.media_from_file(str(IMAGE))
        second_image = proj.media(png_image(32, 24))
        first = chatml(MARKER + "Describe this.")
        second = first + "It is a picture.<|im_end|>\n" + chatml("And the colours?")
        with pyllama.Context(model, n_ctx=1024, n_threads=2) as ctx:
            engine = pyllama.Engine(ctx, 1)
            a = engine_greedy(engine, model, proj, proj.tokenize(first, [image]), 4)
            a.run()
            n0 = proj.n_encoded
            chunks = proj.tokenize(second, [image])
            b = engine_greedy(engine, model, proj, chunks, 6)
            b.run()
            assert proj.n_encoded == n0  # the image came from the sequence, not from the encoder
            head = chunks[0].n_tokens + chunks[1].n_tokens
            assert b.n_reused >= head
            swapped = proj.tokenize(second, [second_image])
            c = engine_greedy(engine, model, proj, swapped, 6)
            c.run()
            assert proj.n_encoded == n0 + 1 and c.n_reused == swapped[0].n_tokens
            engine.close()
        assert b.completion_tokens == loop_greedy(model, proj, chunks, 6)
        assert c.completion_tokens == loop_greedy(model, proj, swapped, 6)


# --- Llama.chat with content parts ---------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_files(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A text model with Qwen 2.5's real chat template, 64 wide like the projectors."""
    from tiny_models import template_text

    path = tmp_path_factory.mktemp("mmchat") / "chat.gguf"
    write_tiny_llama(
        path, n_embd=64, vocab="qwen2", chat_template=template_text("Qwen-Qwen2.5-7B-Instruct"), name="tiny-mm-chat"
    )
    return {**files, "chat": path}


def data_uri(path: Path, kind: str) -> str:
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url: str, text: str = "Describe this.") -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


def test_chat_with_an_image_equals_llama_mtmd_cli(chat_files: dict[str, Path], mtmd_cli: Path) -> None:
    """Llama.chat with an image part before the text renders the model's own template with the media
    marker where the image was, as llama-mtmd-cli renders its prompt (--jinja): the greedy replies are the same
    text. Usage counts the image's tokens; a stream carries the one-shot reply; a second identical
    call reuses the whole prompt but its last token and does not encode the image again."""
    run = subprocess.run(
        [
            str(mtmd_cli),
            *("-m", str(chat_files["chat"]), "--mmproj", str(chat_files["vision"]), "--image", str(IMAGE)),
            *(
                "-p",
                "Describe this.",
                "-n",
                "10",
                "--temp",
                "0",
                "-t",
                "2",
                "--jinja",
            ),  # the template as llama-server runs it
        ],
        capture_output=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    want = run.stdout.decode()
    with pyllama.Llama(chat_files["chat"], mmproj=chat_files["vision"], n_ctx=1024, n_threads=2) as llm:
        assert llm.supports_vision and not llm.supports_audio
        messages = image_message(data_uri(IMAGE, "image/jpeg"))
        out = llm.chat(messages, max_tokens=10, temperature=0.0)
        text = out["choices"][0]["message"]["content"]
        assert want == f"\n{text}\n\n"  # its opening and closing newlines around the reply
        assert llm.projector is not None
        marked = [
            {
                "role": "user",
                "content": [{"type": "media_marker", "text": MARKER}, {"type": "text", "text": "Describe this."}],
            }
        ]
        prompt = llm.chat_template.apply(marked).prompt
        chunks_of = llm.projector.tokenize(prompt, [llm.projector.media_from_file(str(IMAGE))])
        assert out["usage"]["prompt_tokens"] == sum(c.n_tokens for c in chunks_of)  # the image's 16 included
        n = llm.projector.n_encoded
        again = llm.chat(messages, max_tokens=10, temperature=0.0)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == out["usage"]["prompt_tokens"] - 1
        assert llm.projector.n_encoded == n and again["choices"][0]["message"]["content"] == text
        chunks = llm.chat(messages, max_tokens=10, temperature=0.0, stream=True)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text


def test_chat_media_errors_are_typed_and_harmless(chat_files: dict[str, Path], tmp_path: Path) -> None:
    """Media for a Llama without a projector, data: URIs that are not base64 or not an image, URLs
    while fetching is off, local files the policy forbids, audio for a vision projector, an unknown
    audio format: each an InvalidRequestError naming the part; the Llama then replies as before."""
    uri = data_uri(IMAGE, "image/jpeg")
    with pyllama.Llama(chat_files["chat"], n_ctx=512, n_threads=2) as plain:
        with pytest.raises(pyllama.InvalidRequestError) as e:
            plain.chat(image_message(uri), max_tokens=2)
        assert e.value.param == "messages[0].content[0].type" and not plain.supports_vision
    audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(AUDIO.read_bytes()).decode()}}
    bad: list[tuple[list[dict[str, Any]], str]] = [
        (image_message("data:image/jpeg;base64,@@@not-base64@@@"), "messages[0].content[0].image_url.url"),
        (image_message("data:image/jpeg," + "x" * 10), "messages[0].content[0].image_url.url"),
        (
            image_message("data:image/png;base64," + base64.b64encode(b"not an image").decode()),
            "messages[0].content[0]",
        ),
        (image_message("http://127.0.0.1:9/cat.jpg"), "messages[0].content[0].image_url.url"),
        (image_message(str(tmp_path / "missing.jpg")), "messages[0].content[0].image_url.url"),
        ([{"role": "user", "content": [audio_part]}], "messages[0].content[0].type"),  # no audio encoder
    ]
    with pyllama.Llama(chat_files["chat"], mmproj=chat_files["vision"], n_ctx=1024, n_threads=2) as llm:
        before = llm.chat(image_message(str(IMAGE)), max_tokens=6, temperature=0.0)  # a local path is allowed here
        for messages, param in bad:
            with pytest.raises(pyllama.InvalidRequestError) as e:
                llm.chat(messages, max_tokens=2)
            assert e.value.param == param, (messages, e.value)
        llm.media = pyllama.MediaPolicy(files=False)
        with pytest.raises(pyllama.InvalidRequestError):
            llm.chat(image_message(str(IMAGE)), max_tokens=2)
        after = llm.chat(image_message(uri), max_tokens=6, temperature=0.0)
        assert after["choices"][0]["message"] == before["choices"][0]["message"]
    with pyllama.Llama(chat_files["chat"], mmproj=chat_files["audio"], n_ctx=1024, n_threads=2) as listener:
        assert listener.supports_audio and not listener.supports_vision
        ogg = {"type": "input_audio", "input_audio": {"data": audio_part["input_audio"]["data"], "format": "ogg"}}
        with pytest.raises(pyllama.InvalidRequestError) as e:
            listener.chat([{"role": "user", "content": [ogg]}], max_tokens=2)
        assert e.value.param == "messages[0].content[0].input_audio.format"
        heard = listener.chat(
            [{"role": "user", "content": [audio_part, {"type": "text", "text": "What is it?"}]}], max_tokens=4
        )
        assert heard["usage"]["prompt_tokens"] > 375  # the clip's tokens


def test_concurrent_chats_with_images_equal_their_solo_replies(chat_files: dict[str, Path]) -> None:
    """Two chats with different images and one without, at once on a Llama of three sequences: each
    reply is the one a Llama of one sequence gives it alone."""
    import concurrent.futures

    conversations = [
        image_message(data_uri(IMAGE, "image/jpeg")),
        image_message("data:image/png;base64," + base64.b64encode(png_image(48, 32)).decode(), "And this?"),
        [{"role": "user", "content": "No picture at all."}],
    ]
    with pyllama.Llama(chat_files["chat"], mmproj=chat_files["vision"], n_ctx=1024, n_threads=2) as solo:
        want = [solo.chat(m, max_tokens=8, temperature=0.0)["choices"][0]["message"] for m in conversations]
    with (
        pyllama.Llama(chat_files["chat"], mmproj=chat_files["vision"], n_ctx=3072, n_threads=2, n_parallel=3) as llm,
        concurrent.futures.ThreadPoolExecutor(3) as pool,
    ):
        got = list(
            pool.map(lambda m: llm.chat(m, max_tokens=8, temperature=0.0)["choices"][0]["message"], conversations)
        )
    assert got == want


def test_the_server_takes_images_as_data_uris_and_urls_only_when_allowed(chat_files: dict[str, Path]) -> None:
    """/v1/chat/completions with an image_url part: a data: URI gives Llama.chat's reply, through the
    official client too; an http URL is a 400 unless the server allows URLs, and then gives the same
    reply; a path on the server's disk is always a 400; /v1/models says what the model takes."""
    pytest.importorskip("fastapi")
    import http.server
    import threading

    from pyllama.server import create_app
    from test_server import Running, assert_error, post

    uri = data_uri(IMAGE, "image/jpeg")
    with pyllama.Llama(chat_files["chat"], mmproj=chat_files["vision"], n_ctx=1024, n_threads=2) as ref:
        want = ref.chat(image_message(uri), max_tokens=8, temperature=0.0)["choices"][0]["message"]["content"]

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(IMAGE.parent), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    static = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=static.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{static.server_address[1]}/{IMAGE.name}"
    try:
        for allow in (False, True):
            with pyllama.Llama(chat_files["chat"], mmproj=chat_files["vision"], n_ctx=1024, n_threads=2) as llm:
                running = Running(create_app(llm, allow_media_urls=allow))
                try:
                    card = httpx_get(running.url + "/v1/models")["data"][0]
                    assert card["modalities"] == {"vision": True, "audio": False}
                    body = {"model": "m", "messages": image_message(uri), "max_tokens": 8, "temperature": 0}
                    assert (
                        post(running, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"] == want
                    )
                    by_url = post(running, "/v1/chat/completions", {**body, "messages": image_message(url)})
                    if allow:
                        assert by_url.json()["choices"][0]["message"]["content"] == want
                    else:
                        assert_error(by_url, 400, "messages[0].content[0].image_url.url")
                    local = post(running, "/v1/chat/completions", {**body, "messages": image_message(str(IMAGE))})
                    assert_error(local, 400, "messages[0].content[0].image_url.url")
                    if not allow:
                        client = running.client()
                        reply = client.chat.completions.create(
                            model="m", messages=image_message(uri), max_tokens=8, temperature=0
                        )
                        assert reply.choices[0].message.content == want
                finally:
                    running.stop()
    finally:
        static.shutdown()


def httpx_get(url: str) -> Any:
    import httpx

    return httpx.get(url, timeout=30).json()


def test_cli_run_with_an_image_and_info_with_a_projector(chat_files: dict[str, Path]) -> None:
    """pyllama run MODEL --mmproj FILE --image PATH PROMPT streams Llama.chat's reply to the same
    message, as pyllama chat does after /image PATH; pyllama info --mmproj says what the projector takes."""
    import json
    import sys

    with pyllama.Llama(chat_files["chat"], mmproj=chat_files["vision"], n_ctx=1024, n_threads=2) as llm:
        want = llm.chat(image_message(str(IMAGE)), max_tokens=8, temperature=0.0)["choices"][0]["message"]["content"]
    cmd = [sys.executable, "-m", "pyllama"]
    run = subprocess.run(
        [
            *cmd,
            *("run", str(chat_files["chat"]), "Describe this.", "--mmproj", str(chat_files["vision"])),
            *("--image", str(IMAGE), "--max-tokens", "8", "--temperature", "0", "--n-ctx", "1024"),
        ],
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert run.stdout.decode() == want + "\n"
    # pyllama chat: /image goes with the next message, whose reply is the same
    chat = subprocess.run(
        [
            *(*cmd, "chat", str(chat_files["chat"]), "--mmproj", str(chat_files["vision"])),
            *("--max-tokens", "8", "--temperature", "0", "--n-ctx", "1024"),
        ],
        input=f"/image {IMAGE}\nDescribe this.\n".encode(),
        capture_output=True,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr.decode(errors="replace")
    assert chat.stdout.decode() == want + "\n"
    info = subprocess.run(
        [*cmd, "info", str(chat_files["chat"]), "--mmproj", str(chat_files["audio"]), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["modalities"] == {"text": True, "vision": False, "audio": True}


# --- M-RoPE (the Qwen2-VL family): positions that part from the token count ---------------------


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny_models import write_tiny_mmproj_qwen2vl, write_tiny_qwen2vl

    d = tmp_path_factory.mktemp("qwen2vl")
    return {
        "chat": write_tiny_qwen2vl(d / "qwen2vl.gguf", n_embd=64),
        "vision": write_tiny_mmproj_qwen2vl(d / "mmproj-qwen2vl.gguf", text_n_embd=64),
    }


def test_mrope_chat_with_an_image_equals_llama_mtmd_cli(qwen2vl: dict[str, Path], mtmd_cli: Path) -> None:
    """An image takes fewer positions than tokens on an M-RoPE model: the reply after it equals
    llama-mtmd-cli's, and a second turn about it, which reuses the image from the sequence (the text
    after it at its shifted positions), equals the same conversation evaluated afresh."""
    run = subprocess.run(
        [
            str(mtmd_cli),
            *("-m", str(qwen2vl["chat"]), "--mmproj", str(qwen2vl["vision"]), "--image", str(IMAGE)),
            *("-p", "Describe this.", "-n", "10", "--temp", "0", "-t", "2", "--jinja"),
        ],
        capture_output=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    messages = image_message(data_uri(IMAGE, "image/jpeg"))
    with pyllama.Llama(qwen2vl["chat"], mmproj=qwen2vl["vision"], n_ctx=2048, n_threads=2) as llm:
        assert llm.projector is not None
        chunks = llm.projector.tokenize("x" + MARKER, [llm.projector.media_from_file(str(IMAGE))])
        image = next(c for c in chunks if c.type == "image")
        assert image.n_pos < image.n_tokens  # M-RoPE: the positions and the cells part
        out = llm.chat(messages, max_tokens=10, temperature=0.0)
        text = out["choices"][0]["message"]["content"]
        assert run.stdout.decode() == f"\n{text}\n\n"
        follow = [*messages, out["choices"][0]["message"], {"role": "user", "content": "And its colours?"}]
        n = llm.projector.n_encoded
        again = llm.chat(follow, max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=2)
        assert llm.projector.n_encoded == n
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > image.n_tokens
    with pyllama.Llama(qwen2vl["chat"], mmproj=qwen2vl["vision"], n_ctx=2048, n_threads=2) as fresh:
        want = fresh.chat(follow, max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=2)
    # the reused cells were computed in other batches than the fresh ones (the reply a token at a
    # time), which moves the logits by rounding: the tokens agree up to the first near-tie
    assert agree_until_near_tie(again, want)


def agree_until_near_tie(got: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether a chat reply's greedy tokens are another's up to the first token where the other's top-2
    logprob margin is under 1e-3 (both asked with logprobs=True, top_logprobs=2)."""
    tokens = [e["token"] for e in got["choices"][0]["logprobs"]["content"]]
    truth = want["choices"][0]["logprobs"]["content"]
    assert tokens and truth
    for i, entry in enumerate(truth):
        best = sorted((t["logprob"] for t in entry["top_logprobs"]), reverse=True)
        if len(best) > 1 and best[0] - best[1] < 1e-3:
            return True
        if i >= len(tokens) or tokens[i] != entry["token"]:
            return False
    return len(tokens) == len(truth)


def test_mrope_prompts_through_the_engine_together_and_copied(qwen2vl: dict[str, Path]) -> None:
    """Three sequences: two prompts with the same image and different questions, and one without, at
    once; then a prompt that shares the first one's image prefix takes a free sequence by a copy (its
    shifted positions come along). Each reply is its solo run's."""
    with pyllama.Model(str(qwen2vl["chat"])) as model, pyllama.Projector(model, str(qwen2vl["vision"])) as proj:
        image = proj.media_from_file(str(IMAGE))
        prompts = [
            proj.tokenize(chatml(MARKER + "Describe this image in detail, please, " * 4), [image]),
            proj.tokenize(chatml(MARKER + "What colour is it?"), [image]),
            proj.tokenize(chatml("Only text.")),
        ]
        truth = [loop_greedy(model, proj, p, 6) for p in prompts]
        with pyllama.Context(model, n_ctx=3 * 1024, n_seq_max=3, n_threads=2) as ctx:
            engine = pyllama.Engine(ctx, 3)
            reqs = [engine_greedy(engine, model, proj, p, 6) for p in prompts]
            for r in reqs:
                r.run()
            assert [r.completion_tokens for r in reqs] == truth
            longer = proj.tokenize(chatml(MARKER + "Describe this image in detail, please, " * 4 + "now"), [image])
            busy = engine_greedy(engine, model, proj, prompts[0], 200)  # its sequence is busy: a copy, not a reuse
            next(iter(busy))
            n = proj.n_encoded
            copied = engine_greedy(engine, model, proj, longer, 6)
            copied.run()
            busy.cancel()
            busy.run()
            assert proj.n_encoded == n and copied.n_reused >= prompts[0][0].n_tokens + prompts[0][1].n_tokens
            engine.close()
        assert copied.completion_tokens == loop_greedy(model, proj, longer, 6)


def test_chat_with_several_images_in_one_message_and_earlier_turns(chat_files: dict[str, Path]) -> None:
    """Two images in one message after a turn that had a third: the reply is the low-level greedy loop's
    over the template's rendering with a marker per image, tokenised by the projector; media that do not
    fit the context are a ContextLengthError."""
    uri = data_uri(IMAGE, "image/jpeg")
    small = "data:image/png;base64," + base64.b64encode(png_image(40, 30)).decode()
    wide = "data:image/png;base64," + base64.b64encode(png_image(64, 16)).decode()
    messages = [
        *image_message(uri, "What is this?"),
        {"role": "assistant", "content": "A picture."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image_url", "image_url": {"url": small}},
                {"type": "text", "text": "with"},
                {"type": "image_url", "image_url": {"url": wide}},
            ],
        },
    ]
    with pyllama.Llama(chat_files["chat"], mmproj=chat_files["vision"], n_ctx=1024, n_threads=2) as llm:
        proj = llm.projector
        assert proj is not None
        out = llm.chat(messages, max_tokens=8, temperature=0.0)
        marked = [
            {
                **m,
                "content": [
                    p if p["type"] == "text" else {"type": "media_marker", "text": MARKER} for p in m["content"]
                ],
            }
            if isinstance(m["content"], list)
            else m
            for m in messages
        ]
        prompt = llm.chat_template.apply(marked).prompt
        media = [proj.media(base64.b64decode(u.split(",", 1)[1])) for u in (uri, small, wide)]
        chunks = proj.tokenize(prompt, media)
        assert [c.type for c in chunks].count("image") == 3
        assert out["usage"]["prompt_tokens"] == sum(c.n_tokens for c in chunks)
        tokens = loop_greedy(llm.model, proj, chunks, 8)
        ends = [i for i, t in enumerate(tokens) if llm.model.token_is_eog(t)]
        want = str(llm.model.detokenize(tokens[: ends[0]] if ends else tokens))  # chat stops at an end of turn
        assert out["choices"][0]["message"]["content"] == want
    with pyllama.Llama(chat_files["chat"], mmproj=chat_files["vision"], n_ctx=256, n_threads=2) as tiny:
        crowd = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}] * 20}]
        with pytest.raises(pyllama.ContextLengthError):
            tiny.chat(crowd, max_tokens=4)
