"""``hyla bench serve``'s load generator, against a live hyla server and against known requests."""

import asyncio
import threading

import pytest

from tests.helpers import API_KEY, wait_for


def test_the_load_generator_measures_the_live_server(base_url):

    from hyla.bench.serve import run_load

    result = asyncio.run(run_load(base_url, concurrency=2, num_requests=4, input_len=8, output_len=5, api_key=API_KEY,
                                  warmup=1))  # fmt: skip
    assert [r.output_tokens for r in result.records] == [5, 5, 5, 5]  # the warm-up request is not recorded
    assert all(0 < r.ttft <= r.latency for r in result.records) and result.wall > 0


def test_the_load_report_of_known_requests():
    """Two requests over 2 s: 11 tokens in 1.1 s (first after 0.1 s) and 21 in 2.3 s (first after 0.3 s)."""
    from hyla.bench.serve import LoadResult, RequestRecord

    records = [RequestRecord(0.1, 1.1, 11, prompt_tokens=100, cached_tokens=0),
               RequestRecord(0.3, 2.3, 21, prompt_tokens=100, cached_tokens=50, turn=1)]  # fmt: skip
    row = LoadResult(2, records, wall=2.0, workload="chat").row(price_per_hour=3.6)
    assert row["out_tok_s"] == pytest.approx(16.0) and row["req_s"] == pytest.approx(1.0)
    assert row["ttft_p50_ms"] == pytest.approx(200) and row["ttft_p99_ms"] == pytest.approx(300)
    assert row["ttft_turn1_p50_ms"] == pytest.approx(100) and row["ttft_later_p50_ms"] == pytest.approx(300)
    assert row["tpot_p50_ms"] == pytest.approx(100)  # 1.0 s / 10 and 2.0 s / 20 tokens after the first
    assert row["prefix_hit_rate"] == pytest.approx(0.25)
    assert row["usd_per_1m_out"] == pytest.approx(62.5)  # $3.6/h at 16 tok/s: 57,600 tokens per dollar-hour
    plain = LoadResult(2, records, wall=2.0, workload="random").row(price_per_hour=3.6)
    assert "ttft_later_p50_ms" not in plain  # no turns: no empty (NaN) columns
    from hyla.bench.serve import format_table

    assert "nan" not in format_table([row | {"tpot_p99_ms": float("nan")}]) and "| — |" in format_table(
        [row | {"tpot_p99_ms": float("nan")}]
    )


def test_the_load_generator_names_an_unreachable_server():

    from hyla.bench.serve import ServerError, run_load

    with pytest.raises(ServerError, match="cannot reach a server"):
        asyncio.run(run_load("http://127.0.0.1:9/v1", 1, 1, 4, 4))


@pytest.mark.parametrize("workload", ["chat", "agent"])
def test_the_load_generator_runs_conversations_that_hit_the_prefix_cache(base_url, workload):
    from hyla.bench.serve import run_load

    result = asyncio.run(run_load(base_url, concurrency=2, num_requests=0, input_len=0, output_len=4,
                                  api_key=API_KEY, workload=workload, turns=3, system_words=10,
                                  user_words=5, seed=7))  # fmt: skip
    assert sorted(r.turn for r in result.records) == [0, 0, 1, 1, 2, 2]
    assert all(r.output_tokens == 4 for r in result.records)
    later = [r for r in result.records if r.turn > 0]
    assert all(r.cached_tokens > 0 for r in later)  # each turn resends the conversation so far
    row = result.row(price_per_hour=1.0)
    assert 0 < row["prefix_hit_rate"] < 1 and row["ttft_later_p50_ms"] > 0


def test_the_load_generator_names_a_server_without_usage():
    """A server that streams no usage gets a clear error, not a division by zero."""

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from hyla.bench.serve import ServerError, run_load

    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "m"}]}

    @app.post("/v1/completions")
    async def completions():
        async def events():
            yield 'data: {"choices": [{"text": "hi"}]}\n\n'
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with pytest.raises(ServerError, match="sent no usage"):
            asyncio.run(run_load(f"http://127.0.0.1:{port}/v1", 1, 1, 4, 4))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
