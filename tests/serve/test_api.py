"""The OpenAI-compatible server, driven over loopback by the official ``openai`` client."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest
import torch

from hyla.errors import RequestError
from tests.helpers import API_KEY, MODEL, live_server, make_engine, wait_for

PROMPTS = ["def add(a, b):\n", "x", "import os\nprint(os.getcwd())\n" * 3, "class Stack:\n    def push(self, item):"]


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=60)


def solo_greedy(engine, prompt: str, max_tokens: int) -> str:
    """The reference: a full forward over the whole sequence for every token, this prompt alone."""
    e = engine.engine
    seq = torch.tensor([e.inputs.encode(prompt)])
    with torch.no_grad():
        for _ in range(max_tokens):
            nxt = e.model(seq).logits[0, -1, : e.vocab_size].argmax()
            seq = torch.cat((seq, nxt.view(1, 1)), dim=1)
    return e.tokenizer.decode(seq[0, -max_tokens:].tolist())


def metric(base_url: str, name: str) -> float:
    text = httpx2.get(base_url.removesuffix("/v1") + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_completion_equals_the_solo_greedy_decode(client, engine):
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    (choice,) = out.choices
    assert choice.text == solo_greedy(engine, PROMPTS[0], 12)
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(PROMPTS[0]) and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == len(PROMPTS[0]) + 12


def test_concurrent_requests_each_equal_their_solo_decode(client, engine):
    def one(prompt: str) -> str:
        return (
            client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
            )
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, PROMPTS * 2))
    assert texts == [solo_greedy(engine, p, 10) for p in PROMPTS * 2]


def test_streamed_completion_equals_the_whole_one(client):
    args = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=20, temperature=0.7, seed=11)
    whole = client.completions.create(**args).choices[0]
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(PROMPTS[3])


def test_stream_ends_with_done(base_url):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    lines = httpx2.post(base_url + "/completions", json=body, headers=headers).text.strip().split("\n\n")
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line.removeprefix("data: "))["object"] == "text_completion" for line in lines[:-1])


def test_chat_plain_and_streamed(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    args = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**args)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert whole.usage.prompt_tokens == len("system: be brief\nuser: hello\nassistant:")


def test_seeded_samples_repeat_and_n_gives_distinct_choices(client):
    args = dict(model=MODEL, prompt="seed", max_tokens=16, temperature=1.0, seed=3, n=3)
    first, again = client.completions.create(**args), client.completions.create(**args)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage.prompt_tokens == len("seed")  # the prompt once, not once per completion
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1


def test_stop_strings_cut_the_text(client):
    args = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**args).choices[0].text
    stop = text[5:7]
    out = client.completions.create(**args, stop=[stop, "\x00never"]).choices[0]
    assert out.text == text[: text.find(stop)] and out.finish_reason == "stop"
    streamed = client.completions.create(**args, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.text


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) >= 1 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(4)]
    echoed = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0, logprobs=3, echo=True)
    assert echoed.choices[0].logprobs.text_offset == [3 + x for x in lp.text_offset]
    streamed = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0, logprobs=3,
                                         stream=True)  # fmt: skip
    assert [x for c in streamed for x in c.choices[0].logprobs.text_offset] == lp.text_offset
    # Greedy: the chosen token is the most likely one.
    assert all(abs(max(top.values()) - x) < 1e-5 for top, x in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    assert [len(c.top_logprobs) for c in chat.choices[0].logprobs.content] == [2, 2, 2]


def test_models_health_and_metrics(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    root = base_url.removesuffix("/v1")
    assert httpx2.get(root + "/health").status_code == 200
    client.completions.create(model=MODEL, prompt="m", max_tokens=2)
    text = httpx2.get(root + "/metrics").text
    for name in ("hyla_requests_running", "hyla_requests_waiting", "hyla_kv_cache_usage",
                 "hyla_generation_tokens_per_second", "hyla_time_to_first_token_seconds_count",
                 "hyla_time_per_output_token_seconds_bucket", "hyla_generation_tokens_total"):  # fmt: skip
        assert name in text, name
    assert metric(base_url, "hyla_time_to_first_token_seconds_count") >= 1


@pytest.mark.parametrize(
    ("args", "param"),
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=252), "max_tokens"),  # prompt + max_tokens past the 256-token context
        (dict(prompt="x" * 300), "prompt"),  # longer than the context
        (dict(prompt=""), "prompt"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt=[100000]), "prompt"),  # not a token id of this vocabulary
        (dict(n=0), "n"),
        (dict(extra_body={"top_k": -5}), "top_k"),
        (dict(stream_options={"include_usage": True}), "stream_options"),  # without stream
        (dict(temperature="hot"), "temperature"),  # not even a number
        (dict(extra_body={"stop_token_ids": [5, 96]}), "stop_token_ids"),  # 96: past the 96-id vocabulary
    ],
)
def test_invalid_requests_are_400_naming_the_parameter(client, args, param):
    args = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **args}
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(**args)
    assert error.value.status_code == 400
    assert error.value.body["param"] == param
    assert error.value.body["type"] == "invalid_request_error" and error.value.body["message"]


def test_chat_errors(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    assert error.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert error.value.body["param"] == "top_logprobs"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    assert error.value.body["code"] == "model_not_found" and MODEL in error.value.body["message"]


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_missing_or_wrong_key_is_401(base_url, key):
    client = openai.OpenAI(base_url=base_url, api_key=key or "unused", max_retries=0)
    if key is None:
        client.api_key = ""
        response = httpx2.post(base_url + "/completions", json={"model": MODEL, "prompt": "x"})
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        return
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)


def test_a_disconnected_stream_frees_its_slot_and_blocks(client, engine):
    e = engine.engine
    stream = client.completions.create(model=MODEL, prompt="go " * 20, max_tokens=150, stream=True,
                                       extra_body={"ignore_eos": True, "min_tokens": 150})  # fmt: skip
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert e.scheduler.running
    stream.close()
    wait_for(lambda: not e.scheduler.running and not e.requests)
    assert e.cache.blocks.num_free == e.config.num_blocks and e.cache.slots.num_free == e.config.max_num_seqs


def test_a_full_queue_is_503():
    engine = make_engine(max_num_seqs=1, max_waiting=1)
    try:
        with live_server(engine) as url:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
            args = dict(model=MODEL, max_tokens=150, extra_body={"ignore_eos": True})
            running = client.completions.create(prompt="first", stream=True, **args)
            next(iter(running))  # the first request holds the only slot
            done = threading.Event()
            waiting = threading.Thread(
                target=lambda: (client.completions.create(prompt="second", **args), done.set()), daemon=True
            )
            waiting.start()
            wait_for(lambda: len(engine.engine.scheduler.waiting) == 1)
            with pytest.raises(openai.InternalServerError) as error:
                client.completions.create(prompt="third", **args)
            assert error.value.status_code == 503 and "capacity" in error.value.body["message"]
            running.close()
            waiting.join(timeout=60)
            assert done.is_set()
    finally:
        engine.shutdown()


def test_malformed_json_is_400(base_url):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx2.post(base_url + "/completions", content=b'{"model": "hyla-test", "prompt": ', headers=headers)
    error = response.json()["error"]
    assert response.status_code == 400 and error["type"] == "invalid_request_error"
    assert (
        error["param"] is None
        and "not valid JSON" in error["message"]
        and "Expecting value at byte 33" in error["message"]
    )


def test_a_failing_step_fails_its_request_and_the_server_goes_on():
    engine = make_engine()
    real = engine.engine.runner.execute
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] in (1, 7):
            raise RuntimeError("simulated kernel failure")
        return real(*args)

    engine.engine.runner.execute = flaky
    try:
        with live_server(engine) as url:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
            with pytest.raises(openai.InternalServerError) as error:
                client.completions.create(model=MODEL, prompt="boom", max_tokens=3)
            assert error.value.status_code == 500 and "simulated kernel failure" in error.value.body["message"]
            assert client.completions.create(model=MODEL, prompt="fine", max_tokens=3).usage.completion_tokens >= 1
            # Mid-stream (its third step), the status is out already: the error comes as the last event.
            body = {"model": MODEL, "prompt": "stream", "max_tokens": 20, "stream": True}
            events = httpx2.post(url + "/completions", json=body, timeout=60).text.strip().split("\n\n")
            assert events[-1] == "data: [DONE]" and "simulated kernel failure" in events[-2]
            assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "internal_error"
            assert client.completions.create(model=MODEL, prompt="again", max_tokens=2).choices[0].finish_reason
            assert not engine.engine.scheduler.running and engine.engine.cache.slots.num_free == 4
    finally:
        engine.shutdown()


def test_a_client_that_leaves_a_non_streamed_request_aborts_it():
    """The openai client's timeout closes the connection: the generation stops within a step, not at its end."""
    engine = make_engine(step_delay=0.02)
    try:
        with live_server(engine) as url:
            e = engine.engine
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=0.5)
            with pytest.raises(openai.APITimeoutError):
                client.completions.create(model=MODEL, prompt="leave", max_tokens=240,
                                          extra_body={"ignore_eos": True})  # fmt: skip
            wait_for(lambda: not e.scheduler.running and not e.requests, timeout=5)
            assert e.stats.output_tokens < 120  # 240 at 20 ms a step would take ~5 s
            assert e.cache.blocks.num_free == e.config.num_blocks and e.cache.slots.num_free == e.config.max_num_seqs
    finally:
        engine.shutdown()


def test_a_body_over_the_limit_is_413_and_the_server_stays_responsive():
    engine = make_engine()
    try:
        with live_server(engine, max_request_bytes=10_000) as url:
            body = {"model": MODEL, "prompt": "x" * 20_000, "max_tokens": 1}
            response = httpx2.post(url + "/completions", json=body)
            assert response.status_code == 413
            error = response.json()["error"]
            assert "10,000" in error["message"] and error["code"] == "request_too_large"

            def chunks():  # no Content-Length: counted as it arrives
                for _ in range(40):
                    yield b" " * 1000

            response = httpx2.post(url + "/completions", content=chunks(), headers={"Content-Type": "application/json"})
            assert response.status_code == 413 and "over" in response.json()["error"]["message"]
            assert httpx2.get(url.removesuffix("/v1") + "/health").status_code == 200
            ok = httpx2.post(url + "/completions", json={"model": MODEL, "prompt": "x" * 100, "max_tokens": 1})
            assert ok.status_code == 200
    finally:
        engine.shutdown()


def test_a_prompt_known_to_be_past_the_context_is_refused_without_tokenizing(engine):
    e = engine.engine
    tokenizer = e.tokenizer
    refused = "y" * (e.config.max_model_len * 2 + 1)  # a byte-level token spells at most 2 bytes here

    class Untouchable:
        def __getattr__(self, name):
            if name == "encode":
                raise AssertionError("the prompt was tokenized")
            return getattr(tokenizer, name)

    e.tokenizer = Untouchable()
    try:
        with pytest.raises(RequestError, match="at least 257 tokens"):
            e.inputs.encode(refused)
    finally:
        e.tokenizer = tokenizer
    with pytest.raises(RequestError, match="300 tokens"):  # within the bound: tokenized, then refused
        e.inputs.encode("y" * 300)


def test_graceful_shutdown():
    """Once stopped: 503 for new requests and /health; a short request finishes; a long one (streamed or not)
    ends at the deadline with an error: the stream's last events are the error and [DONE]."""
    engine = make_engine(step_delay=0.02, start_thread=False)
    stop = threading.Event()
    result = {}
    loop = threading.Thread(target=lambda: result.update(counts=engine.run(stop=stop, grace_s=1.0)), daemon=True)
    loop.start()
    try:
        with live_server(engine) as url:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
            long = {"model": MODEL, "prompt": "long", "max_tokens": 240, "ignore_eos": True}
            streamed = {}
            threads = [
                threading.Thread(target=lambda: streamed.update(
                    events=httpx2.post(url + "/completions", json={**long, "stream": True}, timeout=60).text)),
                threading.Thread(target=lambda: streamed.update(
                    whole=httpx2.post(url + "/completions", json=long, timeout=60))),
                threading.Thread(target=lambda: streamed.update(short=client.completions.create(
                    model=MODEL, prompt="short", max_tokens=20, extra_body={"ignore_eos": True}))),
            ]  # fmt: skip
            for t in threads:
                t.start()
            wait_for(lambda: len(engine.engine.scheduler.running) == 3)
            stop.set()
            wait_for(lambda: engine.draining)
            with pytest.raises(openai.InternalServerError) as error:
                client.completions.create(model=MODEL, prompt="late", max_tokens=2)
            assert error.value.status_code == 503 and "shutting down" in error.value.body["message"]
            assert httpx2.get(url.removesuffix("/v1") + "/health").status_code == 503
            for t in threads:
                t.join(timeout=30)
            assert streamed["short"].usage.completion_tokens == 20
            events = streamed["events"].strip().split("\n\n")
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "server_shutting_down"
            assert streamed["whole"].status_code == 503
            loop.join(timeout=10)
            assert result["counts"] == (1, 2)  # the short one finished, the two long ones were ended
            e = engine.engine
            assert e.cache.blocks.num_free == e.config.num_blocks and e.cache.slots.num_free == e.config.max_num_seqs
    finally:
        engine.shutdown()


def test_usage_reports_the_cached_prompt_tokens(client):
    prompt = "You are a careful assistant. Answer in one line.\n" * 3  # 150 byte tokens
    args = dict(model=MODEL, max_tokens=2, temperature=0)
    client.completions.create(prompt=prompt + "Q: first", **args)
    second = client.completions.create(prompt=prompt + "Q: second", **args)
    # The second finds the first's blocks up to where they part (144: the shared 150 tokens' last block
    # boundary) but no snapshot there: it computes the prefix and takes one, which the third reads.
    assert second.usage.prompt_tokens_details.cached_tokens == 0
    streamed = list(client.completions.create(prompt=prompt + "Q: third", stream=True,
                                              stream_options={"include_usage": True}, **args))  # fmt: skip
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == 144


def test_a_chat_template_cannot_run_code_and_its_refusals_are_400(tmp_path):
    marker = tmp_path / "pwned"
    template = (
        "{% if messages[0].role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
        f"{{{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}}}"
    )
    engine = make_engine()
    try:
        with live_server(engine, chat_template=template) as url:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
            for messages, match in (
                ([{"role": "system", "content": "x"}], "refused them: no system messages"),
                ([{"role": "user", "content": "x"}], "chat template failed"),
            ):
                with pytest.raises(openai.BadRequestError) as error:
                    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
                assert error.value.body["param"] == "messages" and match in error.value.body["message"]
            assert not marker.exists()
    finally:
        engine.shutdown()


def test_a_request_for_more_sequences_than_the_queue_is_400_before_any_work(client, engine):
    """12,000 prompts x n=128 became 1.5M sequences (+1.5 GB); now refused before anything is tokenized."""
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=[[5, 6]] * 1000, n=128, max_tokens=1)
    assert error.value.body["param"] == "n" and "128,000 sequences" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=[[5, 6]] * 2049, max_tokens=1)
    assert error.value.body["param"] == "prompt" and "at most 2048 prompts" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=65)
    assert error.value.body["param"] == "n"
    assert not engine.engine.requests and engine.num_waiting() == 0


def test_a_lone_surrogate_is_400_naming_the_parameter(base_url):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for route, body, param in (
        ("/completions", b'{"model": "hyla-test", "prompt": "ab\\ud800c", "max_tokens": 1}', "prompt"),
        ("/chat/completions", b'{"model": "hyla-test", "messages": [{"role": "user", "content": "\\udfff"}]}',
         "messages"),
    ):  # fmt: skip
        response = httpx2.post(base_url + route, content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param and "not valid Unicode" in response.json()["error"]["message"]


def test_a_client_that_leaves_while_queued_frees_its_place():
    """One slot, one waiting place: a queued client that leaves is aborted at once (it had kept its place until
    its first token, and a live client got 503)."""
    engine = make_engine(step_delay=0.05, max_num_seqs=1, max_waiting=1)
    try:
        with live_server(engine) as url:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
            args = dict(model=MODEL, max_tokens=200, extra_body={"ignore_eos": True})
            running = client.completions.create(prompt="first", stream=True, **args)
            next(iter(running))
            body = {"model": MODEL, "prompt": "second", "max_tokens": 5}
            with pytest.raises(httpx2.ReadTimeout):
                httpx2.post(url + "/completions", json=body, timeout=1.0)  # queued, then the client leaves
            wait_for(lambda: engine.num_waiting() == 0, timeout=10)
            assert len(engine.engine.requests) == 1  # only the running one; the queued one was never computed
            out = client.completions.create(prompt="third", max_tokens=2, model=MODEL, stream=True)
            running.close()
            assert len([c for c in out if c.choices]) >= 1  # queued, not refused
    finally:
        engine.shutdown()


def test_a_connection_that_sends_no_request_is_closed_after_the_header_timeout(engine):
    import socket

    from hyla.serve.api import build_app, http_server
    from hyla.serve.config import ServerConfig

    server = http_server(build_app(engine, MODEL), ServerConfig(port=0, header_timeout=0.5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
            idle.sendall(b"GET /health HTTP/1.1\r\nHo")  # a slow client: half a request head, then nothing
            assert idle.recv(100) == b""  # closed by the server, not by the 10 s socket timeout
        assert httpx2.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_repeated_errors_are_logged_once_a_minute():
    import logging

    from hyla.serve.api import _Once

    once = _Once()
    records = [logging.LogRecord("asyncio", logging.ERROR, "", 0, "socket.accept() out of system resource", (),
                                 None) for _ in range(1000)]  # fmt: skip
    assert sum(once.filter(r) for r in records) == 1


def test_logprobs_keep_every_alternative_and_the_tokens_own_bytes():
    """Byte tokens 0x80-0xFF all decode to U+FFFD: 20 alternatives stay 20 keys, and a chat entry's bytes are the
    token's own byte, not U+FFFD's."""
    from hyla.data.tokenizer import _BYTE_OF, byte_level_tokenizer
    from hyla.serve.api import _chat_logprobs, _top_logprobs
    from hyla.serve.outputs import TokenLogprob

    tokenizer = byte_level_tokenizer()
    lead, cont = tokenizer.encode("é").ids  # 0xC3 0xA9
    spelled = {b: c for c, b in _BYTE_OF.items()}
    top = [(lead, -0.1), (cont, -0.2)] + [
        (tokenizer.token_to_id(spelled[b]), -1.0 - b / 1000) for b in range(0x80, 0x92)
    ]
    assert len({tokenizer.decode([t]) for t, _ in top[2:]}) == 1  # all U+FFFD
    keys = _top_logprobs(tokenizer, top)
    assert len(keys) == 20 and list(keys.values()) == [lp for _, lp in top]
    entry = _chat_logprobs(tokenizer, [TokenLogprob(lead, -0.1, top[:2])])[0]
    assert entry["bytes"] == [0xC3] and [t["bytes"] for t in entry["top_logprobs"]] == [[0xC3], [0xA9]]


def test_logit_bias_is_honoured_and_unsupported_fields_are_400_not_ignored(client, engine):
    forced = engine.engine.tokenizer.token_to_id("Q")
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0,
                                    logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})  # fmt: skip
    assert out.choices[0].text == "QQQ"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="abc", max_tokens=1, logit_bias={"100000": 5})
    assert error.value.body["param"] == "logit_bias"
    user = [{"role": "user", "content": "x"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for extra, param in (
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [tool]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
    ):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=MODEL, messages=user, max_tokens=1, **extra)
        assert error.value.body["param"] == param, error.value.body
    ok = client.chat.completions.create(model=MODEL, messages=user, max_tokens=1, response_format={"type": "text"},
                                        tool_choice="none")  # fmt: skip
    assert ok.choices[0].finish_reason
    for extra, param in (({"suffix": "end"}, "suffix"), ({"best_of": 2}, "best_of")):
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model=MODEL, prompt="abc", max_tokens=1, **extra)
        assert error.value.body["param"] == param
