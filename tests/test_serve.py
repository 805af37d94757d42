"""`hovle-edge serve` through the real `openai` client, on a free loopback port, against the tiny
exported model: answers equal what the runtime gives without the server, and the server's own
parts (streaming, queueing, prefix and image caches, cancellation, refusals) do what they say."""

import base64
import io
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

import httpx2 as httpx  # noqa: E402  (the HTTP client the openai package installs)

from hovle_edge.runtime import Pipeline  # noqa: E402
from hovle_edge.serve import ServeSettings  # noqa: E402
from hovle_edge.serve.app import create_app  # noqa: E402

KEY = "test-key"
MODEL = "tiny"


def png(colour, size=(70, 50)) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((10, 10, 40, 40), fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class Server:
    """uvicorn on 127.0.0.1, port 0 (the OS picks a free one), in a thread of the test process."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "red.png").write_bytes(png("red"))
    return folder


@pytest.fixture(scope="module")
def server(tiny_export, images_dir):
    settings = ServeSettings(model_dir=str(tiny_export), model_name=MODEL, api_key=KEY, threads=1, slots=4,
                             allow_local_images=str(images_dir), max_body_mb=0.05, max_image_mb=0.02)
    app = create_app(settings)
    running = Server(app)
    running.app = app
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pipe(tiny_export):
    with Pipeline.from_dir(str(tiny_export), threads=1) as pipe:
        yield pipe


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def runtime_answer(pipe, question, image=None):
    """The runtime's own answer (greedy, 12 tokens) and its timings, without the server."""
    conversation = pipe.conversation()
    text = "".join(conversation.ask(question, image, max_new_tokens=12))
    return text, conversation.timings


def ask(client, content, **options):
    options = {"max_tokens": 12, "temperature": 0, **options}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **options)


def test_text_answer_is_the_runtimes(client, pipe):
    answer = ask(client, "what colour is the square?")
    expected, timings = runtime_answer(pipe, "what colour is the square?")
    assert answer.choices[0].message.content == expected
    assert answer.model == MODEL
    assert answer.usage.prompt_tokens == timings.prompt_tokens
    assert answer.usage.completion_tokens + (answer.choices[0].finish_reason == "stop") == timings.new_tokens


def test_image_as_data_url_and_local_file(client, pipe, images_dir):
    parts = [{"type": "image_url", "image_url": {"url": data_url(png("red"))}},
             {"type": "text", "text": "what colour is the circle?"}]
    answer = ask(client, parts)
    expected, timings = runtime_answer(pipe, "what colour is the circle?", str(images_dir / "red.png"))
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == timings.prompt_tokens
    local = [{"type": "image_url", "image_url": {"url": "red.png"}}, parts[1]]
    assert ask(client, local).choices[0].message.content == expected


def test_same_image_second_question_resumes_from_the_cache(client, pipe, images_dir):
    image = {"type": "image_url", "image_url": {"url": data_url(png("blue"))}}
    first = ask(client, [image, {"type": "text", "text": "how many stars?"}])
    second = ask(client, [image, {"type": "text", "text": "where is the circle?"}])
    assert first.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens_details.cached_tokens
    # the shared prefix runs through the image block: the second question computes only its own words
    tiles_rows = second.usage.prompt_tokens - len(pipe.tokenizer.encode("where is the circle?")) - 10
    assert second.usage.prompt_tokens_details.cached_tokens > tiles_rows
    (images_dir / "blue.png").write_bytes(png("blue"))
    expected, _ = runtime_answer(pipe, "where is the circle?", str(images_dir / "blue.png"))
    assert second.choices[0].message.content == expected


def test_streaming_gives_the_same_text_and_usage(client):
    whole = ask(client, "how many stars? three")
    chunks = list(ask(client, "how many stars? three", stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_end_the_answer_before_them(client):
    questions = ["where is the circle?", "a red circle at the top left", "how many stars? three"]
    question, full = max(((q, ask(client, q, max_tokens=24).choices[0].message.content) for q in questions),
                         key=lambda answer: len(answer[1]))
    assert len(full) > 8  # the random-weight model says something long enough to cut
    stop = full[5:8]
    cut = ask(client, question, stop=["never there", stop], max_tokens=24)
    assert cut.choices[0].message.content == full[:full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = ask(client, question, stop=stop, stream=True, max_tokens=24)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.find(stop)]


def test_stop_strings_held_back_across_pieces():
    from hovle_edge.serve.stops import StopStrings

    stops = StopStrings(["END"])
    assert [stops.push(p) for p in ["abE", "N", "Dxyz"]] == ["ab", "", ""] and stops.hit
    stops = StopStrings(["END"])
    assert [stops.push(p) for p in ["abE", "Nq"]] + [stops.flush()] == ["ab", "ENq", ""] and not stops.hit


def test_prefix_cache_resumes_before_the_first_image_that_differs():
    from hovle_edge.serve.caches import PrefixCache, PrefixEntry

    cache = PrefixCache(budget_bytes=1000)
    cache.add(PrefixEntry((1, 2, 7, 7, 8, 3, 4), ("red",), (2,), "snapshot"), nbytes=10)
    cache.add(PrefixEntry((1, 2, 7, 7), ("red",), (2,), "shorter"), nbytes=10)  # a prefix of the first: not kept
    assert len(cache.entries) == 1
    assert cache.longest([1, 2, 7, 7, 8, 3, 9], ["red"], limit=6).length == 6
    assert cache.longest([1, 2, 7, 7, 8, 3, 9], ["blue"], limit=6).length == 2
    assert cache.longest([1, 2, 7, 7, 8, 3, 4], ["red"], limit=6).length == 6  # one id is always left to run
    assert cache.longest([5, 2], [], limit=1) is None
    cache.add(PrefixEntry((9,) * 50, (), (), "big"), nbytes=995)  # over the budget together: the oldest goes
    assert [e.snapshot for e in cache.values()] == ["big"]


def test_multi_turn_equals_a_fresh_computation(client, pipe, server):
    from hovle_edge.serve.protocol import Turn
    from hovle_edge.serve.prompt import prompt_ids

    first = ask(client, "a red circle at the top left").choices[0].message.content
    messages = [{"role": "system", "content": "you answer briefly"},
                {"role": "user", "content": "a red circle at the top left"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "what colour is the square?"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    turns = [Turn(m["role"], m["content"]) for m in messages]
    ids = prompt_ids(pipe.tokenizer, pipe.template, turns, []).ids
    expected = pipe.tokenizer.decode(pipe.conversation().ask_ids(ids, max_new_tokens=10, stop_ids=()))
    assert expected.startswith(answer.choices[0].message.content)
    assert again.choices[0].message.content == answer.choices[0].message.content


def test_concurrent_clients_get_the_answers_they_get_alone(client):
    questions = ["what colour is the square?", "how many stars? three", "where is the circle?"]
    alone = [ask(client, q, temperature=0.9, seed=7, max_tokens=16).choices[0].message.content for q in questions]
    together = [None] * len(questions)

    def run(i):
        together[i] = ask(client, questions[i], temperature=0.9, seed=7, max_tokens=16).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_disconnect_mid_stream_frees_the_slot(client, server):
    worker = server.app.state.worker
    cancelled = worker.cancelled
    assert ask(client, "a red circle", max_tokens=200).choices[0].finish_reason == "length"  # runs long unless cut
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "a red circle"}],
                            "max_tokens": 200, "temperature": 0, "stream": True}, timeout=60) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(4)]  # role chunk, blank line, a token, blank line
    deadline = time.monotonic() + 30
    while (worker.cancelled == cancelled or worker.active) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.cancelled == cancelled + 1 and worker.active == 0
    assert ask(client, "how many stars?").choices[0].message.content  # the server carries on


@pytest.mark.parametrize("change, error, words", [
    ({"messages": []}, openai.BadRequestError, "messages"),
    ({"model": "gpt-4o"}, openai.NotFoundError, "does not exist"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64"}}]}]},
     openai.BadRequestError, "malformed data URL"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     openai.BadRequestError, "base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(b"not a png")}}]}]},
     openai.BadRequestError, "not an image"),
    ({"messages": [{"role": "user", "content": "red " * 2100}]}, openai.BadRequestError, "context"),
    ({"max_tokens": 5000}, openai.BadRequestError, "context"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "../outside.png"}}]}]},
     openai.BadRequestError, "outside"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     openai.BadRequestError, "remote"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, openai.BadRequestError, "user"),
    ({"temperature": -1}, openai.BadRequestError, "temperature"),
])
def test_bad_requests_get_the_right_4xx(client, change, error, words):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **change}
    with pytest.raises(error) as caught:
        client.chat.completions.create(**{k: v for k, v in request.items() if v is not None})
    assert words in caught.value.message


def test_oversized_body_and_image_get_413(client):
    with pytest.raises(openai.APIStatusError) as caught:
        ask(client, "red " * 20000)
    assert caught.value.status_code == 413
    with pytest.raises(openai.APIStatusError) as caught:
        ask(client, [{"type": "image_url", "image_url": {"url": data_url(bytes(30000))}}])
    assert caught.value.status_code == 413 and "image" in caught.value.message


def test_api_key_and_plain_endpoints(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(wrong, "hello")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in right.models.list()] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_server_loads_without_torch(tiny_export):
    from test_torch_free import run_without_torch

    result = run_without_torch(f"""
        from hovle_edge.cli import main
        from hovle_edge.serve import ServeSettings
        from hovle_edge.serve.app import create_app
        create_app(ServeSettings(model_dir={str(tiny_export)!r}))
        sys.argv = ["hovle-edge", "serve", "--help"]
        try:
            main()
        except SystemExit as e:
            assert e.code == 0
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
