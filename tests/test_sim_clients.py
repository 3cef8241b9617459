"""The simulator as real OpenAI clients see vLLM: what LangChain and the OpenAI SDK read."""

from __future__ import annotations

import asyncio
import json
import signal

from autosleepd.sim import expected_text

from .test_reliability import SimProcess


async def test_completions_carry_usage_and_chat_takes_max_completion_tokens(make_sim, http):
    sim = await make_sim()
    async with http.post(sim.url + "/v1/completions",
                         json={"model": "sim-model", "prompt": "one two", "max_tokens": 3}) as response:
        body = await response.json()
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    async with http.post(sim.url + "/v1/chat/completions",
                         json={"model": "sim-model", "max_completion_tokens": 2,
                               "messages": [{"role": "user", "content": "hi there"}]}) as response:
        body = await response.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected_text("hi there", 2)}
    assert body["usage"]["completion_tokens"] == 2


async def test_a_chat_stream_opens_with_the_role_as_vllm_s_does(make_sim, http):
    sim = await make_sim()
    async with http.post(sim.url + "/v1/chat/completions",
                         json={"model": "sim-model", "stream": True, "max_tokens": 2,
                               "messages": [{"role": "user", "content": "a b"}]}) as response:
        events = [line[6:] for line in (await response.text()).splitlines() if line.startswith("data: ")]
    deltas = [json.loads(event)["choices"][0]["delta"] for event in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d["content"] for d in deltas) == expected_text("a b", 2) and events[-1] == "[DONE]"


async def test_autosleepd_sim_stops_on_sigterm_like_vllm():
    """As PID 1 of a container, a process without a SIGTERM handler ignores `docker stop`."""
    sim = SimProcess()
    await sim.start()
    sim.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(sim.process.wait(), 10) == 0
